"""Hub-format model folders: what the Hugging Face Hub (and anyone without this repository) expects to find.

A folder holds the VAE and UNet weights (the project's safetensors checkpoints, unchanged, so their digests and the
UNet's record of its VAE still hold; or both stored at a lower precision, ``dtype``), a ``config.json`` that says what
is in it (architecture, diffusion process, sampling recipe, class names, files), an optional ``results.json``
(measured quality, with the date, machine and command that measured it), and a model card, ``README.md``, generated
from all of that — never written by hand, so it cannot drift from the weights.

* :func:`save_pretrained` — a run folder (or the shipped ``checkpoints/``) → a Hub-format folder.
* ``load_pipeline("owner/name")`` (and ``--checkpoint owner/name``) downloads such a folder from the Hub once
  (:func:`nbutils.checkpoints.resolve_checkpoint`).
* Publishing: ``huggingface_hub.upload_folder(repo_id="you/fashion-ldm", folder_path="checkpoints")``
  after ``huggingface-cli login`` (docs/architecture.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoints import atomic_write_bytes, encode_model, read_model
from .config import Config
from .data import class_names
from .imagefolder import is_folder
from .pipeline import UNET_FILE, VAE_FILE, SamplingRecipe, check_vae

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
CARD_FILE = "README.md"
HUB_DATASETS = {"fashion_mnist": "zalando-datasets/fashion_mnist", "cifar10": "uoft-cs/cifar10"}


def save_pretrained(source: str | Path, out_dir: str | Path, results: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None, recipe: SamplingRecipe | None = None) -> Path:
    """Write the UNet + VAE of ``source`` (a run folder or checkpoint folder) to ``out_dir`` in Hub format.

    ``results`` (e.g. the record ``python -m benchmarks judges`` prints) goes to ``results.json`` and into the
    card; by default the one already in ``source`` is kept. ``recipe`` replaces the sampling recipe stored with the
    UNet (e.g. the one its results were measured with). ``dtype`` (e.g. ``torch.float16``) stores both models'
    floating tensors at that precision, as the shipped weights are (loading converts back to float32); the VAE file
    then holds new tensors, so the UNet's record of its VAE moves to the stored VAE — only after the source pair
    passed :func:`~nbutils.pipeline.check_vae` — and its record before the first such export is kept
    (``vae_record_before_export``). Re-encoded files go to a folder that is not a run: never over ``source``."""
    source, out_dir = Path(source), Path(out_dir)
    unet_tensors, unet_meta = read_model(source / UNET_FILE, "unet")
    vae_tensors, vae_meta = read_model(source / VAE_FILE, "vae")
    vae_meta["path"] = str(source / VAE_FILE)
    check_vae(unet_meta["extra"], vae_meta, str(source / UNET_FILE))
    if results is None and (source / RESULTS_FILE).is_file():
        results = json.loads((source / RESULTS_FILE).read_text())
    rewrite = dtype is not None or recipe is not None
    if rewrite and out_dir.exists():  # a killed write would leave a pair that does not match
        if out_dir.resolve() == source.resolve():
            raise ValueError(f"{out_dir}: re-encoded weights go to a new folder, not over their source")
        if any(out_dir.glob("*_state.pt")) or any(out_dir.glob("*_manifest.json")):
            raise ValueError(f"{out_dir} holds a training run: write a re-encoded export to a folder of its own")
    files: dict[str, bytes] = {}  # everything encoded and checked before anything is written
    if rewrite:
        extra = dict(unet_meta["extra"])
        if recipe is not None:
            extra["sampling_recipe"] = recipe.to_dict()
        if dtype is not None:
            _check_representable({**unet_tensors, **vae_tensors}, dtype)
            vae_extra = dict(vae_meta["extra"], stored_dtype=str(dtype))
            files[VAE_FILE], files["vae.json"] = encode_model(
                "vae", vae_tensors, Config.from_dict(vae_meta["config"]), vae_extra, dtype)
            digest = json.loads(files["vae.json"])["tensor_digest"]
            if digest != vae_meta["tensor_digest"]:
                record = {k: extra.pop(k) for k in ("vae_tensor_digest", "vae_digest") if extra.get(k) is not None}
                extra.setdefault("vae_record_before_export", record)
                extra["vae_tensor_digest"] = digest
            extra["stored_dtype"] = str(dtype)
        files[UNET_FILE], files["unet.json"] = encode_model(
            "unet", unet_tensors, Config.from_dict(unet_meta["config"]), extra, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (UNET_FILE, VAE_FILE):
        if name in files:
            atomic_write_bytes(out_dir / name, files[name])
            atomic_write_bytes((out_dir / name).with_suffix(".json"), files[Path(name).stem + ".json"])
        elif (source / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(source / name, out_dir / name)
            if (source / name).with_suffix(".json").is_file():
                shutil.copyfile((source / name).with_suffix(".json"), (out_dir / name).with_suffix(".json"))
    _, unet_meta = read_model(out_dir / UNET_FILE, "unet")
    _, vae_meta = read_model(out_dir / VAE_FILE, "vae")
    config = hub_config(unet_meta, vae_meta)
    atomic_write_bytes(out_dir / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    if results is not None:
        atomic_write_bytes(out_dir / RESULTS_FILE, (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / CARD_FILE, model_card(config, unet_meta, results).encode())
    return out_dir


def _check_representable(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """An error naming the first floating tensor that ``dtype`` cannot hold (values beyond its range become inf)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.to(dtype)).all():
            raise ValueError(f"{name} has values that {dtype} cannot hold (beyond ±{torch.finfo(dtype).max:g}); "
                             "export it at a wider precision")


def hub_config(unet_meta: dict[str, Any], vae_meta: dict[str, Any]) -> dict[str, Any]:
    """``config.json``: what the folder holds, in the names diffusers users know where they exist."""
    config = Config.from_dict(unet_meta["config"])
    cfg = config.to_dict()
    recipe = SamplingRecipe.from_dict(unet_meta["extra"].get("sampling_recipe") or {})
    return {
        "library_name": "nbutils",
        "pipeline": "class-conditional latent diffusion",
        "files": {"unet": UNET_FILE, "vae": VAE_FILE},
        "weights_sha256": {"unet": unet_meta["tensor_digest"], "vae": vae_meta["tensor_digest"]},
        # a folder of your own images is named by the folder, not by a path on the machine that trained it
        "dataset": (f"images of {len(config.data.class_names)} classes ({Path(cfg['data']['dataset']).name})"
                    if is_folder(cfg["data"]["dataset"]) else cfg["data"]["dataset"]),
        "image_shape": [cfg["data"]["channels"], cfg["data"]["image_size"], cfg["data"]["image_size"]],
        "class_names": list(class_names(config.data)),
        "vae": Config.from_dict(vae_meta["config"]).to_dict()["vae"],
        "unet": cfg["unet"],
        "scheduler": cfg["diffusion"],
        "sampling_recipe": recipe.to_dict(),
    }


def model_card(config: dict[str, Any], unet_meta: dict[str, Any], results: dict[str, Any] | None) -> str:
    """The ``README.md`` of a Hub folder: metadata for the Hub, then what the model is, how it was trained and
    sampled, and what it measured."""
    unet, vae, sched, recipe = config["unet"], config["vae"], config["scheduler"], config["sampling_recipe"]
    extra = unet_meta["extra"]
    interval = recipe["guidance_interval"]
    lines = [
        "---",
        "license: mit",
        "library_name: nbutils",
        "pipeline_tag: unconditional-image-generation",
        *([f"datasets:\n- {HUB_DATASETS[config['dataset']]}"] if config["dataset"] in HUB_DATASETS else []),
        "tags:\n- diffusion\n- latent-diffusion\n- class-conditional\n- classifier-free-guidance",
        "---",
        "",
        f"# Class-conditional latent diffusion on {config['dataset']}",
        "",
        f"A VAE (channels {tuple(vae['block_out_channels'])}, latent {vae['latent_channels']}×"
        f"{config['image_shape'][1] // 4}×{config['image_shape'][2] // 4}) and a class-conditional UNet (channels "
        f"{tuple(unet['block_out_channels'])}, {unet['layers_per_block']} residual block(s) per level, "
        f"cross-attention to {unet['context_tokens']} class tokens) trained on a "
        f"{sched['num_train_timesteps']}-step diffusion process ({sched['beta_schedule']} schedule, "
        f"{sched['prediction_type']} target). Classes: {', '.join(config['class_names'])}.",
        "",
        "This card is generated by `nbutils.hub.save_pretrained` from the files beside it.",
        "",
        "## Use",
        "",
        "```python",
        "import nbutils",
        "from nbutils.pipeline import load_pipeline, sample",
        "",
        'pipe = load_pipeline("THIS_FOLDER_OR_HUB_ID")  # checks the VAE is the one the UNet was trained with',
        'out = sample(pipe, 10, classes="all", generator=nbutils.make_generator(0))  # the recipe below',
        "```",
        "",
        "## Training",
        "",
        f"EMA weights after epoch {extra.get('epoch')} (step {extra.get('step')}). "
        + (f"How: {extra['trained']}." if extra.get("trained") else "")
        + f" UNet dropout {unet['dropout']}, class dropped for guidance with probability {sched['cond_drop_prob']}.",
        "",
        "## Sampling recipe",
        "",
        f"{recipe['sampler']}, "
        + (f"{len(recipe['timesteps'])} listed timesteps ({', '.join(map(str, recipe['timesteps']))}), "
           if recipe.get("timesteps") else
           f"{recipe['steps'] or 'default'} steps, spacing {recipe['timestep_spacing'] or 'default'}, ")
        + ("no classifier-free guidance (w = 1: the conditional model alone)" if recipe["guidance"] == 1 else
           f"classifier-free guidance w = {recipe['guidance']:g}"
           + (f" on {interval[0]} ≤ t ≤ {interval[1]} only" if interval else " on every step"))
        + f", {recipe['precision']}.",
        "",
    ]
    if results:
        lines += ["## Measured quality", "", _results_table(results), ""]
    lines += ["## License", "", "MIT.", ""]
    return "\n".join(lines)


def _results_table(results: dict[str, Any]) -> str:
    """The card's quality table: from a ``python -m benchmarks judges`` record (every judge side by side, test
    reference only), or from an older one-judge record."""
    machine = results.get("machine", {})
    where = (f"measured {results.get('date', '?')[:10]} on {machine.get('cpu', '?')} ({machine.get('cores', '?')} "
             f"cores, torch {machine.get('torch', '?')}) by `{results.get('command', '?')}`.")
    rows = [r for r in results.get("rows", []) if r.get("reference", "test") == "test"]
    judges = list(dict.fromkeys(r["judge"] for r in rows if "judge" in r))
    if not judges:
        lines = ["| images | FID | KID | conditional accuracy | FID ÷ VAE ceiling |", "| --- | --- | --- | --- | --- |"]
        for r in rows:
            ratio = f"{r['fid_vs_ceiling']:g}×" if "fid_vs_ceiling" in r else "—"
            lines.append(f"| {r['row']} | {r['fid']:g} | {r['kid']:g} | {100 * r['cond_acc']:.2f}% | {ratio} |")
        return "\n".join([*lines, "", f"N = {results.get('n')}, features and predictions of the project's "
                                        f"FashionMNIST classifier against the test images; {where}"])
    head = "| images | " + " | ".join(f"{j}: FID | {j}: accuracy | {j}: FID ÷ ceiling" for j in judges) + " |"
    lines = [head, "|" + " --- |" * (1 + 3 * len(judges))]
    for name in dict.fromkeys(r["row"] for r in rows):
        cells = []
        for j in judges:
            r = next((r for r in rows if r["row"] == name and r.get("judge") == j), None)
            if r is None:
                cells += ["—", "—", "—"]
                continue
            ratio = f"{r['fid_vs_ceiling']:g}×" if "fid_vs_ceiling" in r else "—"
            cells += [f"{r['fid']:g}", f"{100 * r['cond_acc']:.2f}%", ratio]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", f"N = {results.get('n')} against the 10,000 test images, judged by the project's "
                                    f"FashionMNIST classifiers {', '.join(judges)} (features for FID, predictions "
                                    f"for accuracy); {where}"])
