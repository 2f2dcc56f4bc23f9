import numpy as np
import torch

from distill.data.batching import DistillCollator, encode_example, tokenize_pair


def test_labels_mask_prompt_and_keep_eos_when_pad_is_eos(tokenizer):
    ex = tokenize_pair(tokenizer, "Q: 1 + 1? A:", " 2.", max_length=64)
    n_prompt = ex["prompt_len"]
    assert all(label == -100 for label in ex["labels"][:n_prompt])
    assert ex["labels"][-1] == tokenizer.eos_token_id
    collate = DistillCollator(pad_token_id=tokenizer.eos_token_id)  # pad == eos
    short = tokenize_pair(tokenizer, "Q: 2? A:", " 2.", max_length=64)
    batch = collate([ex, short])
    # the EOS label survives although padding uses the same id
    assert (batch["labels"] == tokenizer.eos_token_id).sum() == 2
    assert batch["attention_mask"][1, len(short["input_ids"]):].sum() == 0
    assert (batch["labels"][1, len(short["input_ids"]):] == -100).all()


def test_sparse_rows_land_on_shifted_positions():
    k = 3
    topk = np.arange(4 * k, dtype=np.int32).reshape(4, k)
    lp = np.log(np.full((4, k), 0.2, dtype=np.float32))
    tail = np.full(4, 0.4, dtype=np.float32)
    ex = encode_example([5, 6, 7], [10, 11, 12, 2], 64, topk, lp, tail)
    batch = DistillCollator(pad_token_id=0)([ex, encode_example([5], [9, 2], 64, topk[:2], lp[:2], tail[:2])])
    shifted_labels = batch["labels"][:, 1:]
    counted = shifted_labels != -100
    # every counted position has a teacher row and vice versa
    assert torch.equal(counted, torch.isfinite(batch["topk_logprobs"][..., 0]))
    assert torch.equal(batch["topk_ids"][0, 2], torch.tensor([0, 1, 2]))  # row 0 predicts response token 0
    assert batch["topk_tail"][1, 0] == torch.tensor(0.4) and batch["topk_tail"][1, 2] == 0


def test_truncation_and_too_long_prompt():
    assert encode_example(list(range(10)), [1, 2], max_length=10) is None
    ex = encode_example([1, 2, 3], [4, 5, 6, 7], max_length=5)
    assert ex["input_ids"] == [1, 2, 3, 4, 5] and ex["labels"] == [-100, -100, -100, 4, 5]


def test_empty_prompt_gets_a_start_token(tokenizer):
    ex = tokenize_pair(tokenizer, "", "hello", max_length=32)
    assert ex["input_ids"][0] == tokenizer.bos_token_id and ex["prompt_len"] == 1
    assert ex["labels"][0] == -100 and ex["labels"][1] != -100  # the first response token is predicted
