"""`align rm`'s own yardstick after training: pairwise accuracy on the validation split and on
the held-out subsets."""
from __future__ import annotations

import time

from ..scoring.pairs import NO_LIMIT, PackedPairCollator, pair_scores, pairwise_metrics



def evaluate(cfg, run, model, tok, val_rows, eval_rows) -> dict:
    """Pairwise accuracy (ties 1/2) on the validation split (training length) and on the
    held-out subsets (``train.eval_max_length``, 0 = untruncated)."""
    from ..chat import tokenize_pair
    from ..runs import is_main_process

    say = print if is_main_process() else (lambda *a, **k: None)  # every rank evaluates, one reports
    t, out = cfg.train, {}
    if val_rows:
        val = pair_scores(model, [tokenize_pair(tok, r) for r in val_rows],
                          PackedPairCollator(tok.pad_token_id, t.max_length, t.max_prompt_length), t.batch_size)
        out["validation"] = pairwise_metrics(val)
        say(f"validation pairwise accuracy ({len(val_rows)} pairs of the training subsets): "
              f"{out['validation']['pairwise_accuracy']:.3f}")
    if cfg.evaluate and eval_rows:
        limit = t.eval_max_length or NO_LIMIT
        te = time.time()
        scores = pair_scores(model, [tokenize_pair(tok, r) for r in eval_rows],
                             PackedPairCollator(tok.pad_token_id, limit, limit - 1), t.batch_size)
        ev = {**pairwise_metrics(scores), "eval_subsets": cfg.data.eval_subsets,
              "max_length": t.eval_max_length or "untruncated", "eval_seconds": round(time.time() - te, 1)}
        run.write_json("eval.json", ev)
        run.log({"step": -1, **{f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)}})
        out["eval"] = ev
        say(f"held-out pairwise accuracy ({', '.join(cfg.data.eval_subsets)}, {ev['pairs']} pairs, "
              f"{ev['max_length']}): {ev['pairwise_accuracy']:.3f}")
    return out
