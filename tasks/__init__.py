"""Task code, one module per task, each used by its entry script (see docs/ARCHITECTURE.md):
``retrieval`` (+ ``retrieval_eval``, BLIP's evaluation protocol) for ``train_retrieval.py``,
``contextblip_pretrain`` for ``pretrain.py``, ``imagecode`` for ``zero_shot.py``,
``finetune_imagecode.py`` and ``eval_mmvp.py``, and ``sweep_mask`` for ``run.sh sweep-mask``."""
