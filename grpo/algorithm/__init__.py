"""The algorithm as pure tensor functions: advantages, KL estimators, policy and value losses,
preference losses. No model, no config, no I/O; shapes in every docstring; imports only torch."""
