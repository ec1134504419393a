"""The scoring layer under every job: what a model reads for a batch of answers (rows or
packed groups: :mod:`.batch`, :mod:`.packing`; preference pairs: :mod:`.pairs`), the one token
log-prob function (:mod:`.logprobs`), the DPO implicit reward and reward-model scores of pairs
(:mod:`.pairs`), and the statistics reported on them (:mod:`.stats`). It imports no job."""
