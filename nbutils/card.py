"""A model folder in Hub format: ``config.json`` and the model card (``README.md``), generated from the weights'
metadata, and the writing of such a folder.

A folder holds the VAE and UNet weights (the project's safetensors checkpoints, each with its config and the digest
of its tensors), a ``config.json`` that says what is in it (architecture, diffusion process, how each model was
trained, sampling recipe, class names, files), an optional ``results.json`` (measured quality, with the date, machine
and command that measured it), and a model card generated from all of that — never written by hand, so it cannot
drift from the weights. Both :meth:`nbutils.pipeline.Pipeline.save_pretrained` (a pipeline in memory) and
:func:`nbutils.hub.save_pretrained` (a run folder, re-encoded or not) write folders through :func:`write_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoints import UNET_FILE, VAE_FILE, atomic_write_bytes, read_model
from .config import Config
from .data import class_names
from .imagefolder import is_folder

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
CARD_FILE = "README.md"
HUB_DATASETS = {"fashion_mnist": "zalando-datasets/fashion_mnist", "cifar10": "uoft-cs/cifar10"}


def write_folder(out_dir: str | Path, files: dict[str, bytes], recipe: dict[str, Any],
                 results: dict[str, Any] | None = None) -> Path:
    """Write ``files`` (name → bytes: the two weights files and their ``.json`` copies, encoded and checked by the
    caller) to ``out_dir``, then ``config.json``, ``results.json`` (when given) and the card, all read back from
    the written weights. ``recipe`` is the sampling recipe as a dict with every field."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        atomic_write_bytes(out_dir / name, payload)
    _, unet_meta = read_model(out_dir / UNET_FILE, "unet")
    _, vae_meta = read_model(out_dir / VAE_FILE, "vae")
    config = hub_config(unet_meta, vae_meta, recipe)
    atomic_write_bytes(out_dir / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    if results is not None:
        atomic_write_bytes(out_dir / RESULTS_FILE, (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / CARD_FILE, model_card(config, results).encode())
    return out_dir


def hub_config(unet_meta: dict[str, Any], vae_meta: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """``config.json``: what the folder holds, in the names diffusers users know where they exist."""
    config = Config.from_dict(unet_meta["config"])
    cfg = config.to_dict()
    vae_cfg = Config.from_dict(vae_meta["config"]).to_dict()
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
        "vae": vae_cfg["vae"],
        "unet": cfg["unet"],
        "scheduler": cfg["diffusion"],
        "training": {
            "vae": {"preset": vae_cfg["preset"], **vae_cfg["train_vae"],
                    "epochs_trained": vae_meta["extra"].get("epoch"), "steps_trained": vae_meta["extra"].get("step")},
            "unet": {"preset": cfg["preset"], **cfg["train_unet"], "then": cfg["finetune_unet"],
                     "epochs_trained": unet_meta["extra"].get("epoch"), "steps_trained": unet_meta["extra"].get("step"),
                     **({"distilled_from": unet_meta["extra"]["distilled_from"]}
                        if unet_meta["extra"].get("distilled_from") else {})},
        },
        "sampling_recipe": recipe,
    }


def _training_text(config: dict[str, Any]) -> list[str]:
    """The card's training section, from ``config["training"]`` (the configs recorded in the weights)."""
    vae, unet = config["training"]["vae"], config["training"]["unet"]
    then = unet["then"]
    phases = f"{unet['epochs'] if then['epochs'] else unet['epochs_trained']} epochs at lr {unet['lr']:g}" + (
        f", then {then['epochs']} more at lr {then['lr']:g} (a second phase: fresh optimizer and warm-up, the weights "
        "and their EMA carried on)" if then["epochs"] else "")
    last = f"the second phase's epoch {unet['epochs_trained']}" if then["epochs"] else f"epoch {unet['epochs_trained']}"
    lines = [
        f"- **VAE**: {vae['epochs']} epochs, batch {vae['batch_size']}, Adam lr {vae['lr']:g} after "
        f"{vae['lr_warmup_steps']} warm-up steps, gradient clipping at {vae['grad_clip']:g}, loss = MSE + "
        f"{config['vae']['kl_weight']:g}·KL; EMA weights (decay {vae['ema_decay']}) after epoch "
        f"{vae['epochs_trained']}, step {vae['steps_trained']}.",
        f"- **UNet**: {phases}; batch {unet['batch_size']}, Adam, {unet['lr_warmup_steps']} warm-up steps, gradient "
        f"clipping at {unet['grad_clip']:g}, dropout {config['unet']['dropout']:g}, the class dropped with "
        f"probability {config['scheduler']['cond_drop_prob']:g} (for classifier-free guidance)"
        + (f", min-SNR loss weighting γ = {config['scheduler']['min_snr_gamma']:g}"
           if config["scheduler"].get("min_snr_gamma") else "")
        + f"; EMA weights (decay {unet['ema_decay']}) after {last}, step {unet['steps_trained']}.",
    ]
    teacher = unet.get("distilled_from")
    if teacher:
        interval = teacher.get("guidance_interval")
        lines.append("- The UNet is a guidance-distilled student (Meng et al. 2023): it learned to give in one pass "
                     f"what its teacher, the UNet with tensors SHA-256 {teacher.get('unet_tensor_digest', '?')[:12]}…, "
                     f"gives with guidance w = {teacher.get('guidance', '?'):g}"
                     + (f" on {interval[0]} ≤ t ≤ {interval[1]}" if interval else "") + " in two; the command is "
                     "recorded with the weights (`extra.trained` in `unet.json`).")
    elif {vae["preset"], unet["preset"]} == {"shipped"}:
        lines.append("- Reproduce: `make reproduce` (both models, the `shipped` preset).")
    else:
        lines.append(f"- Presets: VAE `{vae['preset']}`, UNet `{unet['preset']}` "
                     f"(`python -m nbutils train-vae --preset {vae['preset']}`, then `train-unet --preset "
                     f"{unet['preset']}`).")
    return lines


def model_card(config: dict[str, Any], results: dict[str, Any] | None) -> str:
    """The ``README.md`` of a Hub folder: metadata for the Hub, then what the model is, how it was trained and
    sampled, and what it measured."""
    unet, vae, sched, recipe = config["unet"], config["vae"], config["scheduler"], config["sampling_recipe"]
    interval = recipe["guidance_interval"]
    lines = [
        "---",
        "license: mit",
        "library_name: nbutils",
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
        "This card is generated by `nbutils.card` from the files beside it.",
        "",
        "## Use",
        "",
        "```python",
        "import nbutils",
        "from nbutils.pipeline import load_pipeline, sample",
        "",
        'pipe = load_pipeline("THIS_FOLDER_OR_HUB_ID")  # checks the VAE is the one the UNet was trained with',
        "# or: from nbutils.pipeline import Pipeline; pipe = Pipeline.from_pretrained(\"THIS_FOLDER_OR_HUB_ID\")",
        'out = sample(pipe, 10, classes="all", generator=nbutils.make_generator(0))  # the recipe below',
        "```",
        "",
        "## Training",
        "",
        *_training_text(config),
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
