"""A learned positive-sentiment reward: frozen all-MiniLM-L6-v2 embeddings + a logistic head
trained on labelled IMDB reviews (../shared). Used by the PPO demo as a custom reward.

``positive_sentiment(prompts, completions)`` returns the classifier's log-odds of "positive"
(unbounded, like a reward model's score); ``positive_probability`` returns P(positive) in [0, 1].
The head is trained once (seconds) and cached beside the mirror.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch

from align.assets import MINILM_ID, mirror_dir, resolve_dataset, resolve_model
from align.placement import resolve_device

CLASSIFIER_ROWS = (0, 1200)  # reviews used to fit the head; PPO prompts come from other rows


def read_imdb(path: str | Path | None = None) -> list[dict]:
    from align.data.rows import LoadReport, iter_jsonl

    path = Path(path or resolve_dataset("imdb-reviews"))
    if path.is_dir():
        path = path / "reviews.jsonl.gz"
    return [row for _, row in iter_jsonl(path, LoadReport(), strict=True)]


def clean_review(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("<br />", " ")).strip()


class MiniLMEmbedder:
    def __init__(self, name: str = MINILM_ID):
        from transformers import AutoModel, AutoTokenizer

        where = resolve_model(name)
        self.tok = AutoTokenizer.from_pretrained(where)
        # float32: a 22M-parameter encoder whose fitted head (cached) expects its float32 embeddings
        self.model = AutoModel.from_pretrained(where, dtype=torch.float32).to(resolve_device("auto")).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256,
                           return_tensors="pt").to(self.model.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            emb = (h * m).sum(1) / m.sum(1).clamp(min=1)  # mean pooling, as sentence-transformers does
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())  # the head lives on the CPU
        return torch.cat(out)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, steps: int = 200) -> torch.nn.Linear:
    head = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x).squeeze(-1), y)
        loss = loss + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


class SentimentScorer:
    """P(positive | text) from MiniLM + a logistic head fitted on IMDB reviews."""

    def __init__(self, cache: Path | None = None):
        self.embed = MiniLMEmbedder()
        cache = cache or (mirror_dir() / "cache" / "imdb_sentiment_head.pt")
        if cache.is_file():
            state = torch.load(cache, map_location="cpu")
            self.head = torch.nn.Linear(state["weight"].shape[1], 1)
            self.head.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
            self.heldout_accuracy = state.get("heldout_accuracy")
        else:
            self.head, self.heldout_accuracy = self._fit()
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save({**self.head.state_dict(), "heldout_accuracy": self.heldout_accuracy}, tmp)
            tmp.replace(cache)

    def _fit(self):
        rows = read_imdb()[CLASSIFIER_ROWS[0]:CLASSIFIER_ROWS[1]]
        texts = [clean_review(r["review"]) for r in rows]
        y = torch.tensor([1.0 if r["sentiment"] == "positive" else 0.0 for r in rows])
        x = self.embed(texts)
        n_fit = int(0.8 * len(rows))  # the last 20% of these rows check the head
        head = fit_logistic(x[:n_fit], y[:n_fit])
        with torch.no_grad():
            acc = float(((head(x[n_fit:]).squeeze(-1) > 0).float() == y[n_fit:]).float().mean())
        return head, acc

    @torch.no_grad()
    def logits(self, texts: list[str]) -> torch.Tensor:
        return self.head(self.embed(texts)).squeeze(-1)


@lru_cache(maxsize=1)
def _scorer() -> SentimentScorer:
    return SentimentScorer()


def positive_sentiment(prompts, completions, **info) -> list[float]:
    """Reward = log-odds that the completion text is positive (the prompt is not scored)."""
    return _scorer().logits([c if c.strip() else "." for c in completions]).tolist()


def positive_probability(prompts, completions, **info) -> list[float]:
    """Reward = P(positive) of the completion text, in [0, 1]."""
    return torch.sigmoid(_scorer().logits([c if c.strip() else "." for c in completions])).tolist()
