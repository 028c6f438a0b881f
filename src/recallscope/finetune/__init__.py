"""Fine-tuning a pretrained model on new facts and measuring how fast each fact is learned.

Modules (each imported on its own; importing this package loads nothing heavy):

- :mod:`recallscope.finetune.knowledge`: batched teacher-forced checks of what a Hugging Face causal LM
  already knows (does greedy decoding write this continuation?), and short greedy generations.
- :mod:`recallscope.finetune.lora`: low-rank adapters (LoRA, Hu et al. 2021) written in plain torch.
- :mod:`recallscope.finetune.trunk`: run a Llama-family model's frozen lower layers once and train only
  the upper ones (the cached trunk), with an exactness check against the full forward.
- :mod:`recallscope.finetune.curves`: full-batch training that records every item's answer log-prob at
  every step (the learning curve), resumable from a checkpoint.
- :mod:`recallscope.finetune.stats`: learning-curve area, paired sign-flip test, bootstrap CI and a
  simulation-based power analysis.
"""
