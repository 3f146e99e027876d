"""thinkless training: the `thinkless-train` command (warm-up SFT, DeGRPO RL, evaluation)."""
