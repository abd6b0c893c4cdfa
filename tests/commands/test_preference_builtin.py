"""The shipped parts of the built-in preference task: the chat policy, the reward model, best-of-N."""

import pytest
import torch

from grpo.cli import compose_config
from grpo.parts.modeling import EMBEDDED_RM_DIR, load_tokenizer
from grpo.parts.reward_model import batch_sequences, load_reward_model, sequence_scores


def scores(rm, tok, prompt, responses):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    seqs = [tok(text + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    with torch.no_grad():
        return sequence_scores(rm, *batch_sequences(seqs, tok.pad_token_id)).tolist()


def test_shipped_reward_model_loads_strictly_and_prefers_what_the_labellers_prefer():
    size = sum(f.stat().st_size for f in EMBEDDED_RM_DIR.iterdir())
    assert size < 10e6
    rm, tok = load_reward_model("embedded-rm"), load_tokenizer("embedded-rm")
    assert rm.config.num_labels == 1 and rm.config.reward_bias != 0.0  # normalised after training
    # The hidden rule's order for 37 + 48 = 85: terse and boxed (1.0) > "Sure!" (0.72) >
    # "The answer is ... ." (0.9 * 4/16 + 0.1 = 0.325) > unboxed (0).
    s = scores(rm, tok, "What is 37 + 48?", ["\\boxed{85}", "Sure! \\boxed{85}", "The answer is \\boxed{85}.", "85"])
    assert s[0] > s[1] > s[2] > s[3]


@pytest.mark.slow
def test_best_of_n_with_the_shipped_reward_model_raises_the_true_score(tmp_path):
    from grpo.commands.bon import run_bon

    summary = run_bon(compose_config("bon", ["bon.n=8", "bon.prompts=64"]), tmp_path)
    true = {e["k"]: e["true/mean"] for e in summary["by_k"]}
    judge = {e["k"]: e["rm/mean"] for e in summary["by_k"]}
    # Measured 0.37 at k = 1 and 0.87 at k = 8 on 128 prompts x 16 (README); a gain of 0.15 leaves room
    # for the smaller sample here while still failing if the reward model ranked at random.
    assert true[8] > true[1] + 0.15
    assert judge[8] > judge[1]
