"""Evaluation, teacher vs students on the same held-out prompts. The arrows run one way:

    generation (load + greedy generate)  <-  cost, peak_memory, fidelity  <-  evaluate (the stage)
    metrics (task scores)                <-  api_teacher, evaluate
"""
