"""Write nbutils/fixtures/exercises.safetensors from the answer key (instructor/answers.py).

For every exercise and every test input: the input tensors (scalars go to the metadata), the solution's output
and the outputs of the known mistakes that differ from it. Run after changing answers.py, from the repository
root: ``python instructor/make_fixtures.py``; tests/test_exercises.py checks the file matches the answer key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import answers  # noqa: E402 - this folder is not a package

from nbutils.exercises import EXERCISES, FIXTURES, _compare, normalise  # noqa: E402


def build() -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    index: dict = {}

    def put(name: str, value) -> str:
        tensors[name] = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).clone()
        return name

    for key, ex in EXERCISES.items():
        if ex.task is not None:  # judged by a measured result, not by stored cases
            continue
        fn = answers.solved(key)
        labels = [label for label, _ in answers.MISTAKES[key]]
        entry = {"mistakes": labels, "cases": []}
        for i, (kwargs, description) in enumerate(answers.CASES[key]()):
            args = {}
            for name, v in kwargs.items():
                if isinstance(v, torch.Tensor):
                    args[name] = {"tensor": put(f"{key}.{i}.in.{name}", v)}
                elif isinstance(v, np.ndarray):
                    args[name] = {"tensor": put(f"{key}.{i}.in.{name}", torch.from_numpy(v)), "numpy": True}
                else:
                    args[name] = {"value": v}
            out = normalise(fn(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}))
            assert "error" not in out, (key, out)
            expected = [put(f"{key}.{i}.out.{j}", v) for j, v in enumerate(out["values"])]
            mistakes = {}
            for m, (_, wrong) in enumerate(answers.MISTAKES[key]):
                try:
                    got = normalise(wrong(**kwargs))
                except Exception:  # noqa: BLE001 - a mistake that does not apply to this input
                    continue
                if "error" in got or _compare(got, out["values"], out["tuple_len"], 1e-9, 1e-12) is None:
                    continue  # no output, or indistinguishable from the right answer on this input
                if got["tuple_len"] != out["tuple_len"] or len(got["values"]) != len(out["values"]):
                    continue
                mistakes[str(m)] = [put(f"{key}.{i}.m{m}.{j}", v) for j, v in enumerate(got["values"])]
            entry["cases"].append({"description": description, "args": args, "expected": expected,
                                   "tuple_len": out["tuple_len"], "mistakes": mistakes})
        index[key] = entry
    return tensors, index


def main() -> None:
    tensors, index = build()
    FIXTURES.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(FIXTURES),
              metadata={"index": json.dumps(index, ensure_ascii=False)})
    print(f"{FIXTURES}: {len(index)} exercises, {len(tensors)} tensors, {FIXTURES.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
