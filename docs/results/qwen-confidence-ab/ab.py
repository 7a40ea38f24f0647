"""A/B of the auto schedule with and without the confidence stop, one process, interleaved."""
import json, statistics, sys
from specdecode import SpeculativeGenerator, load_model, ModelDrafter
from specdecode.drafters import make_schedule
from specdecode.models import draft_dtype_for

rows = [json.loads(l) for l in open("/work/main/src/specdecode/data/bench_prompts.jsonl")]
prompts = [r for r in rows if r["category"] == "code"][:2] + [r for r in rows if r["category"] == "chat"][:2]
t = load_model("qwen2.5-coder-1.5b", threads=2)
d = load_model("qwen2.5-coder-0.5b", dtype=draft_dtype_for(t), threads=2)
gens = {
    "plain": SpeculativeGenerator(t),
    "auto+stop": SpeculativeGenerator(t, ModelDrafter(d), make_schedule("auto", 5, True)),
    "auto-k": SpeculativeGenerator(t, ModelDrafter(d), make_schedule("auto", 5, False)),
}
for g in gens.values():
    g.generate("def f(x):", max_new_tokens=8)
res = {n: {} for n in gens}
ref = {}
for i, r in enumerate(prompts):
    names = list(gens)[i % 3:] + list(gens)[: i % 3]
    for n in names:
        out = gens[n].generate(r["turns"][0], chat=r["category"] == "chat", max_new_tokens=64)
        s = out.stats
        tps = len(out.token_ids) / s.total_seconds
        res[n][i] = (tps, s.tau, out.token_ids)
        print(r["category"], i, n, f"{tps:.2f} tok/s tau {s.tau:.2f} rounds {s.rounds} drafted {s.drafted}", flush=True)
for n in gens:
    for i in range(len(prompts)):
        assert res[n][i][2] == res["plain"][i][2], (n, i)
for cat, idx in (("code", [0, 1]), ("chat", [2, 3]), ("all", [0, 1, 2, 3])):
    for n in ("auto+stop", "auto-k"):
        sp = [res[n][i][0] / res["plain"][i][0] for i in idx]
        print(cat, n, "speedup over our plain, median", f"{statistics.median(sp):.2f}", [f"{x:.2f}" for x in sp])
