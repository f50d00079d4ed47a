# %% [markdown]
# # Locate the neurons behind a fact, then boost and suppress them
# Runs on the embedded SmolLM2 (offline). `python examples/01_locate_and_intervene.py`, or cell by cell.

# %%
import torch

import qrnca_lens as ql

model = ql.load_model("smollm2")                      # a TransformerLens TransformerBridge
pool = ql.load_data("builtin:facts")                  # 5 relations x 20 cloze facts
queries = [q for q in pool if q.id.endswith(("-01", "-02", "-03"))]   # 15 queries over 5 relations
proxy = ql.ProxyConfig("cloze")                       # 3 templates, 4 in-context facts each

# Competence first: attributing a proxy the model cannot do measures noise.
print(ql.accuracy(model, queries, proxy, pool=pool))

# %% QRNCA over the collection (ICA and common neurons need several queries)
run = ql.locate(model, queries, ql.LocateConfig(proxy=proxy), pool=pool)
print(run)
print(run.to_dataframe().head(10))

# %% Boost and suppress one query's QR neurons on its own prompt
from qrnca_lens.proxies import build_prompts

query = queries[0]
prompt = build_prompts(query, proxy, model.tokenizer, pool=pool)[0]
neurons = [(layer, n) for layer, n, _ in run.qr_neurons(query.id)]
tokens = torch.tensor([prompt.tokens])
first = prompt.target[0]


def p_first(logits):
    return torch.softmax(logits[0, -1], -1)[first].item()


with torch.no_grad():
    clean = p_first(model(tokens))
    with ql.boost(model, neurons):                    # f_i <- 2 f_i at the last position
        boosted = p_first(model(tokens))
    with ql.suppress(model, neurons):                 # f_i <- 0
        suppressed = p_first(model(tokens))
print(f"{query.question!r} -> {query.answer!r}: p = {clean:.3f}, boosted {boosted:.3f}, suppressed {suppressed:.3f}")
