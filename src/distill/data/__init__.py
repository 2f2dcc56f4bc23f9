"""Data in: prompt corpora (file, line and field in every error), prompt rendering, the tokenisation of
training examples and their batches, chain-of-thought rows and cross-tokenizer batches.

Modules: `prompts` (load/validate/render), `encoding` (the one prompt tokenisation rule), `batching`
(examples, collator, left padding), `cot` (reasoning split and two-task examples), `crosstok` (the teacher's
view of a student batch).
"""
