"""Supervised fine-tuning of GLM-4.1V-Thinking on long chain-of-thought replies (paper §4).

    python sft.py --tiny --init-from runs/pretrain                       # after `python pretrain.py --tiny`
    torchrun --nproc_per_node 8 sft.py --preset 9b --init-from RELEASED_DIR --data sft.jsonl

SFT's job in the paper is the answer *format and style* — `<think>…</think><answer>…</answer>` with the final
answer in one `<|begin_of_box|>…<|end_of_box|>` — so that RL can then work on correctness. It is full-parameter
training on conversations with the loss on assistant tokens only (data.render_chat builds that mask), 32,768
tokens per packed sequence and a global batch of 32 for the 9B. One choice of ours: a share of the replies
(`--no-think-share`, 10% by default) have an empty `<think></think>`, which makes `sample.py --no-think` a real
switch — the released model cannot turn thinking off.

`--lora-rank r` makes it LoRA fine-tuning instead: the model frozen, low-rank adapters trained (lora.py) — what fits
the 9B on one GPU. Everything else — the loop, FSDP2, checkpoints, resuming, the Hugging Face export — is
pretrain.py's trainer.
"""
import pretrain

if __name__ == "__main__":
    pretrain.main(stage_defaults={"stage": "sft"}, description=__doc__)
