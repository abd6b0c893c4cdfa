"""One file per `grpo` command. The training loops (train = GRPO, ppo, dpo, rm, sft) each read top
to bottom on the run skeleton of grpo/parts/run.py; the others sample (bon, eval), build data
(prefs, embedded), or read what runs wrote (compare, export, plot)."""
