"""Student training: the stage (`train`: config -> student dirs), `DistillationTrainer` (`trainer`: a plain
transformers.Trainer whose compute_loss sums registered losses) and on-policy sampling (`onpolicy`)."""
