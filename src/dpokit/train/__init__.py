"""Training: one shared loop (loop.py, with its parts by concern: runtime, order, optim, metrics,
checkpoint, lock, callbacks); each stage only supplies a step (dpo_step, kto, sft_step, rm_step,
rl_step) and the reference log-prob cache (refcache)."""
