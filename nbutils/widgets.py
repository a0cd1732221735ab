"""An interactive sampler for notebooks: pick a class, guidance, sampler, steps and seed, press Generate.

``sampler_widget(pipe)`` shows the controls (ipywidgets) and a first grid with the starting settings.
Where ipywidgets is not installed, or there is no notebook front end to draw widgets, it says so and falls
back to a plain call of :func:`show_samples` with the same arguments, so the notebook still runs top to
bottom (nbval, scripts).
"""

from __future__ import annotations

import time

import matplotlib.pyplot as plt
import torch

from .config import make_generator
from .data import CLASS_NAMES, class_index, class_labels
from .pipeline import Pipeline, SamplingRecipe, sample
from .plotting import show_grid

SAMPLERS = {"DPM-Solver++ (2M)": "dpm", "SDE-DPM-Solver++ (2M)": "dpm-sde", "DDIM": "ddim", "DDPM (ancestral)": "ddpm"}


def show_samples(pipe: Pipeline, class_name: str | int = "all", guidance: float = 3.0, sampler: str = "dpm",
                 steps: int = 20, seed: int = 0, n: int = 20, ax=None):
    """Sample ``n`` images and show them as a grid titled with the settings and the wall time.

    ``class_name``: a class name or index, ``"all"`` (cycle through the ten) or ``"none"`` (unconditional).
    Returns the :class:`~nbutils.pipeline.SampleResult`.
    """
    labels = torch.tensor(class_labels(class_name, n))
    t0 = time.perf_counter()
    recipe = SamplingRecipe(sampler=sampler, steps=steps, guidance=guidance)
    result = sample(pipe, n, labels, recipe, make_generator(seed))
    seconds = time.perf_counter() - t0
    what = class_name if not isinstance(class_name, int) else CLASS_NAMES[class_name]
    show_grid(result.images, nrow=10 if n >= 10 else n, ax=ax,
              title=f"{what} · {sampler} {steps} steps · guidance {guidance:g} · seed {seed} · {seconds:.2f} s")
    return result


def _frontend_available() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def sampler_widget(pipe: Pipeline, n: int = 20, **defaults):
    """The interactive sampler (returns the ipywidgets box), or a plain :func:`show_samples` call
    (returns its result) where widgets cannot be shown."""
    try:
        import ipywidgets as W
    except ImportError:
        W = None
    if W is None or not _frontend_available():
        why = "ipywidgets is not installed" if W is None else "no notebook front end to draw widgets"
        print(f"({why}: showing one grid with the default settings instead)")
        return show_samples(pipe, n=n, **defaults)

    from IPython.display import display  # IPython is there whenever a front end is

    style = {"description_width": "70px"}
    start = defaults.get("class_name", "all")
    if not (isinstance(start, str) and start.strip().lower() in ("all", "none")):
        start = CLASS_NAMES[class_index(start)]
    controls = {
        "class_name": W.Dropdown(options=["all", *CLASS_NAMES, "none"], value=start,
                                 description="class", style=style),
        "sampler": W.Dropdown(options=list(SAMPLERS.items()), value=defaults.get("sampler", "dpm"),
                              description="sampler", style=style),
        "guidance": W.FloatSlider(value=defaults.get("guidance", 3.0), min=0.0, max=10.0, step=0.5,
                                  description="guidance", style=style),
        "steps": W.IntSlider(value=defaults.get("steps", 20), min=1, max=250, description="steps", style=style),
        "seed": W.IntText(value=defaults.get("seed", 0), description="seed", style=style),
    }
    button = W.Button(description="Generate", button_style="primary", icon="magic")
    out = W.Output()

    def generate(_=None):
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(7, 1.6 + 0.7 * ((n + 9) // 10)))
            show_samples(pipe, n=n, ax=ax, **{k: w.value for k, w in controls.items()})
            plt.show()

    button.on_click(generate)
    c = controls
    box = W.VBox([W.HBox([c["class_name"], c["sampler"], c["seed"]]), W.HBox([c["guidance"], c["steps"]]),
                  button, out])
    box.generate = generate  # for scripted use and tests
    display(box)
    # the first grid goes straight into the cell's output (not the widget's output area), so that a saved
    # notebook shows it in viewers that cannot draw widgets (GitHub, nbviewer); Generate draws above it
    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.7 * ((n + 9) // 10)))
    show_samples(pipe, n=n, ax=ax, **{k: w.value for k, w in controls.items()})
    plt.show()
    return box
