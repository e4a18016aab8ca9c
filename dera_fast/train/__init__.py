"""Training: the LARP / DeRA tokenizer trainer, the AR generator trainer and what they share.

* :mod:`.tokenizer`   ``TokenizerTrainConfig`` / ``TokenizerTrainer`` (L1 + LPIPS-style + GAN + VQ + prior + DeRA
  alignment with SACP; DDP under torchrun)
* :mod:`.generator`   ``GeneratorTrainConfig`` / ``GeneratorTrainer`` (token files, class dropout; FSDP2)
* :mod:`.sacp`        SACP for training: DeRA's loss rewriting (Algorithm 1) and explicit per-group PCGrad
* :mod:`.losses`      perceptual loss, transformer discriminator, GAN losses, LeCam
* :mod:`.optim`       Adam param groups with persistent LR multipliers, warm-up + cosine, EMA
* :mod:`.checkpoint`  atomic, pickle-free checkpoints (safetensors + JSON), keep-last-N, bit-exact resume
* :mod:`.tokens`      token files written by ``python -m dera_fast tokenize``
* :mod:`.distributed`, :mod:`.loop`  torchrun plumbing, resumable sharded batches, JSONL log, progress bars

Submodules import lazily (``from dera_fast.train.tokenizer import TokenizerTrainer``), so ``import dera_fast``
stays light.
"""
