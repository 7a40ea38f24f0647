"""``specdecode generate``: JSON output equals transformers, and bad input is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specdecode.cli.main import main

PROMPT = "def add(a, b):"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(["generate", *args])
    except SystemExit as exit_:  # argparse's own errors (a bad option value) exit with 2
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def hf_greedy(tiny, arch: str, prompt: str, new: int) -> list[int]:
    t = tiny(arch)
    enc = t.tokenizer(prompt, return_tensors="pt")
    out = t.model.generate(**enc, do_sample=False, max_new_tokens=new)
    return out[0, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize(
    "drafter",
    [
        [],
        ["--prompt-lookup"],
        ["--draft", "perturbed"],  # int8 draft, auto schedule: the defaults
        ["--draft", "perturbed", "--confidence-stop"],
        ["--draft", "perturbed", "--draft-dtype", "float32", "--draft-schedule", "constant"],
        ["--draft", "perturbed", "--kv-cache", "static"],  # int8 draft on a static cache too
        ["--draft", "perturbed", "--draft-prompt-window", "3"],  # reads the prompt's tail
        ["--draft", "perturbed", "--prompt-lookup"],  # lookup in front of the draft model
    ],
)
def test_json_greedy_equals_transformers(capsys, tiny, tiny_dir, drafter):
    args = [PROMPT, "--target", str(tiny_dir("qwen2")), "--max-new-tokens", "30", "--json"]
    if drafter[:1] == ["--draft"]:
        drafter = ["--draft", str(tiny_dir("qwen2", "perturbed")), *drafter[2:]]
    code, out, _ = run_cli(capsys, *args, *drafter)
    assert code == 0
    payload = json.loads(out)
    assert payload["token_ids"] == hf_greedy(tiny, "qwen2", PROMPT, 30)
    assert payload["text"] == tiny("qwen2").tokenizer.decode(payload["token_ids"])
    assert {"tau", "alpha", "new_tokens", "tokens_per_second"} <= payload["stats"].keys()


def test_json_samples_are_independent_and_reproducible(capsys, tiny_dir):
    args = [PROMPT, "--target", str(tiny_dir("llama")), "--max-new-tokens", "12", "--json"]
    sampled = [*args, "--temperature", "1.0", "-n", "3", "--seed", "7", "--prompt-lookup"]
    code, out, _ = run_cli(capsys, *sampled)
    assert code == 0
    samples = json.loads(out)["samples"]
    assert len(samples) == 3
    assert len({tuple(s["token_ids"]) for s in samples}) > 1
    assert len({s["seed"] for s in samples}) == 3
    _, again, _ = run_cli(capsys, *sampled)
    assert [s["token_ids"] for s in json.loads(again)["samples"]] == [
        s["token_ids"] for s in samples
    ]


def test_streams_text_and_prints_a_summary(capsys, tiny_dir):
    code, out, err = run_cli(
        capsys, PROMPT, "--target", str(tiny_dir("gpt2")), "--max-new-tokens", "8"
    )
    assert code == 0
    assert out.endswith("\n") and "tok/s" in err and "tau" in err and "alpha" in err


def test_penalties_and_bias_reach_the_loop(capsys, tiny_dir):
    args = [PROMPT, "--target", str(tiny_dir("qwen2")), "--max-new-tokens", "4", "--json"]
    code, out, _ = run_cli(capsys, *args, "--logit-bias", "42=100", "--frequency-penalty", "0.5")
    assert code == 0
    payload = json.loads(out)
    assert payload["token_ids"][0] == 42  # forced, then penalised: 100 - 0.5 per repeat


def test_constrained_output_options(capsys, tiny_dir, tmp_path):
    args = [PROMPT, "--target", str(tiny_dir("qwen2")), "--max-new-tokens", "40", "--json"]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "yes.lark").write_text('start: "yes" | "no"')
    for extra in (
        ["--regex", r"[0-9]{2}x"],
        ["--choice", "red", "--choice", "blue"],
        ["--grammar", str(tmp_path / "yes.lark")],
        ["--json-schema", str(tmp_path / "schema.json"), "--prompt-lookup"],
        ["--json-schema", json.dumps(schema), "--draft", str(tiny_dir("qwen2", "perturbed"))],
    ):
        code, out, _ = run_cli(capsys, *args, *extra)
        assert code == 0, extra
        payload = json.loads(out)
        kind = payload["settings"]["grammar"]["kind"]
        if payload["finish_reason"] == "eos":
            text = payload["text"]
            assert {"regex": text[:2].isdigit(), "choice": text in ("red", "blue")}.get(kind, True)
            assert kind != "lark" or text in ("yes", "no")
    code, _, err = run_cli(capsys, *args, "--regex", "a", "--choice", "b")
    assert code == 2 and "not allowed with" in err  # one constraint at a time


def test_logprobs_in_json_and_as_a_table(capsys, tiny_dir):
    args = [PROMPT, "--target", str(tiny_dir("qwen2")), "--max-new-tokens", "6", "--logprobs", "2"]
    code, out, _ = run_cli(capsys, *args, "--prompt-lookup", "--json")
    assert code == 0
    payload = json.loads(out)
    logprobs = payload["logprobs"]
    assert [lp["token_id"] for lp in logprobs] == payload["token_ids"]
    assert all(lp["logprob"] <= 0 and len(lp["top"]) == 2 for lp in logprobs)
    code, out, err = run_cli(capsys, *args)
    assert code == 0
    lines = err.strip().splitlines()
    table = lines[[i for i, line in enumerate(lines) if "tok/s" in line][-1] + 1 :]
    assert len(table) == 6 and all("|" in line for line in table)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "0.5", "--top-p", "1.5"], "top_p"),
        (["--temperature", "0.5", "--top-p", "0"], "top_p"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["-n", "0"], "num-samples"),
        (["--draft-prompt-window", "0"], "prompt window"),
        (["--draft-prompt-window", "many"], "prompt window"),
        (["--logprobs", "-2"], "logprobs"),
        (["--logit-bias", "5"], "ID=BIAS"),
        (["--logit-bias", "x=1"], "ID=BIAS"),
        (["--logit-bias", "99999=1"], "outside"),
        (["--presence-penalty", "nan"], "presence_penalty"),
        (["--regex", "(ab"], "unclosed group"),
        (["--json-schema", "missing.json"], "cannot read"),
        (["--json-schema", "{oops"], "not valid JSON"),
    ],
)
def test_bad_settings_are_clear_errors(capsys, tiny_dir, extra, message):
    code, _, err = run_cli(capsys, PROMPT, "--target", str(tiny_dir("llama")), *extra)
    assert code == 2
    assert "error" in err and message in err and "Traceback" not in err


def test_empty_prompt_is_an_error(capsys, tiny_dir):
    code, _, err = run_cli(capsys, "", "--target", str(tiny_dir("llama")))
    assert code == 2 and "empty" in err


def test_prompt_longer_than_context_is_an_error(capsys, tiny_dir):
    long_prompt = "word " * 2000
    code, _, err = run_cli(capsys, long_prompt, "--target", str(tiny_dir("llama")))
    assert code == 2 and "at most 512" in err


def test_mismatched_vocabulary_is_an_error(capsys, tmp_path, tiny_dir):
    from specdecode.testing import make_tiny_model

    make_tiny_model(tmp_path, "llama", vocab_size=300)  # a different tokenizer
    code, _, err = run_cli(
        capsys, PROMPT, "--target", str(tiny_dir("llama")), "--draft", str(tmp_path)
    )
    assert code == 2 and "tokenizer does not match" in err


def test_missing_model_is_an_error(capsys):
    code, _, err = run_cli(capsys, PROMPT, "--target", "./no/such/folder")
    assert code == 2 and "no such file or folder" in err


def test_console_script_reads_stdin_without_traceback(tiny_dir):
    cmd = [
        sys.executable,
        "-m",
        "specdecode.cli.main",
        "generate",
        "--target",
        str(tiny_dir("gpt2")),
    ]
    ok = subprocess.run(
        [*cmd, "--max-new-tokens", "5", "--json"], input=PROMPT, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["token_ids"]) == 5
    bad = subprocess.run(
        [*cmd, "--top-k", "-3", "--temperature", "1"], input=PROMPT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "top_k" in bad.stderr
