"""The memory-manager bridge (nodes/memory.py) against ComfyUI's contract.

Each scenario below takes the pack's nodes and a `comfy.model_management` module and asserts what
ComfyUI's memory manager does with our models: a re-queue keeps them placed, POST /free
(`unload_all_models`) releases them, --lowvram streams the transformer, and another model needing
the room makes core call `partially_unload` / `detach` on ours. They run twice: against
tests/comfy_stub.py (always), and against the REAL comfy.model_management / comfy.model_patcher of
the ComfyUI checkout named by COMFYUI_DIR, in a subprocess started with ComfyUI's `--cpu` argument
(COMFYUI_PYTHON: a python that can import that ComfyUI, default this one); skipped without it.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import traceback
import weakref

import pytest
import torch

import comfy_stub
import real_comfy
from test_nodes import comfy, load_pack, models_root  # noqa: F401  (comfy, models_root: fixtures used by name)



# ------------------------------------------------------------------ scenarios (stub or real ComfyUI)
_COUNTERS: dict = {}     # id(shared module) -> (kind, acquires, releases) of the Workflow that loaded it


def _count_calls():
    """Count Component.acquire/release per loaded module, once per process. Components are frozen
    values, so the count wraps the class (counting only modules a Workflow registered) and holds no
    reference to a component: a cycle through one would keep our models alive until a garbage
    collection, which is not how ComfyUI holds them."""
    from cogvid_core.run import session
    if getattr(session.Component, "_counted", False):
        return
    for method, slot in (("acquire", 1), ("release", 2)):
        original = getattr(session.Component, method)

        def counted(self, _original=original, _slot=slot):
            entry = _COUNTERS.get(id(self.module))
            if entry is not None:
                entry[_slot][entry[0]] += 1
            return _original(self)
        setattr(session.Component, method, counted)
    session.Component._counted = True


class Workflow:
    """The shipped workflow's graph on the tiny 1.5 checkpoint (small video), counting what ComfyUI makes our
    components do: acquire (placed for a use) and release (all weights off the device)."""

    def __init__(self, nodes):
        self.nodes = nodes
        kw = dict(precision="fp32", placement="auto", device="auto")
        model = "CogVideo/CogVideoX1.5-5B-I2V"
        self.tr = self.run("CogVidTransformerLoader", model=model, **kw)[0]
        self.t5 = self.run("CogVidT5Loader", model=model, **kw)[0]
        self.vae = self.run("CogVidVAELoader", model=model, **kw)[0]
        self.acquires = {c.kind: 0 for c in self.components}
        self.releases = dict(self.acquires)
        for comp in self.components:        # keyed by the shared module: every copy of a value counts
            _COUNTERS[id(comp.module)] = (comp.kind, self.acquires, self.releases)
        _count_calls()

    @property
    def components(self):
        return (self.tr, self.t5, self.vae)

    def run(self, node_id, **inputs):
        return self.nodes[node_id].EXECUTE_NORMALIZED(**inputs)

    def prepare(self, prompt="a fox runs"):
        """The text and image half of a queue."""
        self.cond = self.run("CogVidTextEncode", t5=self.t5, positive=prompt, negative="")[0]
        image = torch.linspace(0, 1, 40 * 60 * 3).reshape(1, 40, 60, 3)
        self.lat = self.run("CogVidImageEncode", vae=self.vae, image=image, width=48, height=32, resize="crop")[0]

    def queue(self, seed):
        """Text -> image -> sampler -> decode: one queue of the shipped workflow's graph."""
        self.prepare()
        return self.run("CogVidDecode", vae=self.vae, latent=self.sample(seed), tile="auto", overlap=0.1667)[0]

    def sample(self, seed, steps=1):
        return self.run("CogVidSampler", transformer=self.tr, conditioning=self.cond, image_latent=self.lat,
                        frames=17, steps=steps, cfg=6.0, dynamic_cfg=True, scheduler="dpm", seed=seed)[0]

    def placements(self):
        from cogvid_core.memory.placement import placed_of
        return [placed_of(c.module) for c in self.components]


def ours(mm):
    return [p for p in mm.loaded_models() if hasattr(p, "component")]


def scenario_requeue(nodes, mm):
    """The same workflow queued twice with a new seed: ComfyUI re-requests loaded models
    (`detach(unpatch_all=False)` then `partially_load`); nothing is released nor placed again."""
    w = Workflow(nodes)
    first = w.queue(seed=1)
    placed = w.placements()
    assert all(p is not None for p in placed)
    assert sorted(p.component.kind for p in ours(mm)) == ["t5", "transformer", "vae"]
    second = w.queue(seed=2)
    assert w.releases == {"transformer": 0, "t5": 0, "vae": 0}
    assert all(a is b for a, b in zip(w.placements(), placed))          # the same placements, not new ones
    assert w.acquires == {"transformer": 2, "t5": 1, "vae": 4}          # t5: the prompt cache answers queue 2
    assert len(ours(mm)) == 3 and not torch.equal(first, second)


def scenario_free(nodes, mm):
    """POST /free {"unload_models": true} is `unload_all_models()`: every component released."""
    w = Workflow(nodes)
    w.prepare()
    w.sample(seed=1)
    mm.unload_all_models()
    assert w.releases == {"transformer": 1, "t5": 1, "vae": 1}
    assert w.placements() == [None, None, None] and not ours(mm)
    w.sample(seed=3)                                                     # usable again: placed anew
    assert [p.component for p in ours(mm)] == [w.tr] and w.placements()[0] is not None


def scenario_lowvram(nodes, mm):
    """ComfyUI started with --lowvram and no plan wired: the sampler streams the transformer.
    (Under --cpu core forces vram_state to DISABLED, so the state --lowvram gives on a GPU is set.)"""
    from cogvid_core.memory.activations import ff_chunk_tokens
    from cogvid_core.memory.placement import placed_of
    w = Workflow(nodes)
    w.prepare()
    saved, mm.vram_state = mm.vram_state, mm.VRAMState.LOW_VRAM
    try:
        w.sample(seed=2)
    finally:
        mm.vram_state = saved
    assert placed_of(w.tr.module).requested == "stream" and ff_chunk_tokens(w.tr.module) == 8192


class _Device:
    """A compute device of fixed size whose free memory is what loaded models do not hold: core's
    free_memory then asks each model for exactly what is still missing (the host's free RAM, what
    core reads under --cpu, moves on its own and would make the amounts unpredictable)."""

    def __init__(self, mm, total):
        self.mm, self.total = mm, total

    def __call__(self, dev=None, torch_free_too=False):
        free = self.total - sum(p.loaded_size() for p in self.mm.loaded_models())
        return (free, free) if torch_free_too else free

    def __enter__(self):
        self.saved, self.mm.get_free_memory = self.mm.get_free_memory, self
        return self

    def __exit__(self, *exc):
        self.mm.get_free_memory = self.saved


def scenario_other_model(nodes, mm):
    """Another model needs the room: core's `free_memory(memory_required, device)` calls our
    `partially_unload` with what is missing; ours frees all it holds, reports it, and stays listed
    (placed again on its next use); a bigger need than it holds detaches it."""
    w = Workflow(nodes)
    w.prepare()
    mm.unload_all_models()                                               # T5 and VAE out: only ours left
    w.sample(seed=1)
    p = w.tr.patcher
    held, dev = p.loaded_size(), p.load_device
    assert held == p.model_size() > 0 and [x.component for x in ours(mm)] == [w.tr]
    with _Device(mm, total=10 * held) as device:
        mm.free_memory(device() + held // 2, dev)
    assert w.releases["transformer"] == 1 and p.loaded_size() == 0 and p in ours(mm)
    assert p.partially_unload(p.offload_device, 1) == 0                 # nothing left to free: says so
    w.sample(seed=2)
    assert p.loaded_size() == held and w.acquires["transformer"] == 2
    with _Device(mm, total=10 * held) as device:
        mm.free_memory(device() + 2 * held, dev)
    assert w.releases["transformer"] == 2 and not ours(mm)


def scenario_idle_unload(nodes, mm):
    """Core unloading a model that holds nothing on its GPU (offloaded or streamed, between uses) frees
    no VRAM by it: the host state stays (no new placement on the next use), core's entry goes."""
    w = Workflow(nodes)
    w.prepare()
    placed = w.placements()
    for comp in (w.t5, w.vae):
        # what loaded_size() answers on a GPU between uses (under --cpu a placed model counts its size)
        comp.patcher.loaded_size = lambda: 0
    mm.unload_all_models()
    assert w.releases == {"transformer": 0, "t5": 0, "vae": 0} and not ours(mm)
    assert w.placements()[1:] == placed[1:] and all(p is not None for p in placed[1:])
    kept = [weakref.ref(w.t5.module), weakref.ref(w.vae.module)]
    for comp in (w.t5, w.vae):
        del comp.patcher.loaded_size
    mm.unload_all_models()                                               # holding weights: released
    assert w.releases == {"transformer": 0, "t5": 0, "vae": 0}            # not listed any more: untouched
    w.prepare(prompt="another prompt")
    mm.unload_all_models()
    assert w.releases["t5"] == 1 and w.releases["vae"] == 1 and w.placements()[1:] == [None, None]
    # POST /free with free_memory drops the node outputs: the kept host state goes with the values
    for comp in (w.t5, w.vae):
        comp.patcher.loaded_size = lambda: 0
    w.prepare(prompt="a third prompt")
    mm.unload_all_models()
    del w, comp, placed
    gc.collect()
    assert [r() for r in kept] == [None, None]


def scenario_clone(nodes, mm):
    """`clone()` is a real clone (core's signature of 2026 too), loading it replaces the original."""
    w = Workflow(nodes)
    p = w.tr.patcher
    twin = p.clone()
    assert twin is not p and twin.is_clone(p) and twin.component is w.tr and twin.model_size() == p.model_size()
    assert p.is_dynamic() is False and twin.is_dynamic() is False
    if _core_clone_takes_kwargs(p):                                      # ComfyUI 2026 (and the stub)
        assert p.clone(disable_dynamic=True).is_clone(p)
    with pytest.raises(ValueError, match="loader node"):
        p.clone(force_deepcopy=True)
    mm.load_models_gpu([p])
    mm.load_models_gpu([twin])                                           # core drops the original's entry
    assert ours(mm) == [twin] and w.releases["transformer"] == 0


def scenario_file_backed(nodes, mm):
    """The loaders' transformer and T5 are file-backed: unloading leaves meta placeholders and the
    weight index (no host copy kept), and the next use reads the weights from the files again, bit
    for bit the same video."""
    from cogvid_core.model.fileindex import index_of
    w = Workflow(nodes)
    first = w.queue(seed=1)
    mm.unload_all_models()
    for c in (w.tr, w.t5):
        assert index_of(c.module) is not None and all(t.is_meta for t in c.module.parameters()), c.kind
    assert index_of(w.vae.module) is None                               # the VAE is read into memory
    assert torch.equal(w.queue(seed=1), first)                          # transformer re-read from its file
    w.prepare(prompt="another prompt")                                   # not cached: T5 re-read from its file
    assert not any(t.is_meta for t in w.t5.module.parameters())


def _core_clone_takes_kwargs(p):
    import inspect
    base = next(c for c in type(p).__mro__ if c.__name__ == "ModelPatcher")
    return "disable_dynamic" in inspect.signature(base.clone).parameters


SCENARIOS = {f.__name__: f for f in (scenario_requeue, scenario_free, scenario_lowvram, scenario_other_model,
                                     scenario_idle_unload, scenario_clone, scenario_file_backed)}


# ------------------------------------------------------------------ against the stub (always; `comfy`: test_nodes.py's)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bridge_on_stub(comfy, name):
    nodes, mods = comfy
    SCENARIOS[name](nodes, mods["comfy.model_management"])

def test_budget_counts_dynamic_vram(comfy):
    """2026 dynamic VRAM: idle dynamic models' VRAM counts as free (core's ModelPatcher.get_free_memory);
    a core without that method (0.3.64) gives mm.get_free_memory alone."""
    nodes, mods = comfy
    mm, mp = mods["comfy.model_management"], mods["comfy.model_patcher"]
    common = sys.modules[nodes["CogVidSampler"].__module__.rsplit(".", 1)[0] + ".common"]
    gpu = torch.device("cuda", 0)
    plain = mm.get_free_memory(gpu) - mm.extra_reserved_memory()
    assert common.budget_bytes(0, gpu) == plain
    mp.ModelPatcher.dynamic_vram_held = 5 * 1024 ** 3
    try:
        assert common.budget_bytes(0, gpu) == plain + 5 * 1024 ** 3
        method = mp.ModelPatcher.__dict__["get_free_memory"]
        del mp.ModelPatcher.get_free_memory                       # ComfyUI 0.3.64: no such method
        try:
            assert common.budget_bytes(0, gpu) == plain
        finally:
            mp.ModelPatcher.get_free_memory = method
    finally:
        mp.ModelPatcher.dynamic_vram_held = 0
    assert common.budget_bytes(2.5, gpu) == int(2.5 * 1024 ** 3) and common.budget_bytes(0, torch.device("cpu")) is None

def test_loader_outputs_visible_to_ram_cache(comfy):
    """ComfyUI 2026's RAM-pressure cache recognises model outputs by `.patcher`."""
    nodes, mods = comfy
    w = Workflow(nodes)
    for comp in w.components:
        assert isinstance(comp.patcher, mods["comfy.model_patcher"].ModelPatcher)
        assert comp.patcher.component is comp and comp.patcher.model_size() == comp.total_bytes()
    # no reference cycle through the patcher: dropped outputs leave core's list at once, not at a
    # later garbage collection in the middle of core's free_memory loop
    gc.disable()
    try:
        patchers = [weakref.ref(c.patcher) for c in w.components]
        del w, comp
        assert [p() for p in patchers] == [None, None, None]
    finally:
        gc.enable()

def test_interrupt_is_not_an_exception(comfy, monkeypatch):
    """Cancel (a BaseException in 2026) stops the sampler and releases the transformer."""
    from cogvid_core.run import session
    nodes, mods = comfy
    mm = mods["comfy.model_management"]
    w = Workflow(nodes)
    w.prepare()
    done = []
    monkeypatch.setattr(session.Component, "done", lambda self: done.append(self.kind))
    mm.interrupt_processing = True
    with pytest.raises(comfy_stub.InterruptProcessingException):
        w.sample(seed=2, steps=3)
    assert done == ["transformer"] and not issubclass(comfy_stub.InterruptProcessingException, Exception)

# -------------------------------------------------------------- against a real ComfyUI (optional)
@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run")
def test_bridge_on_real_comfyui(models_root):
    results = real_comfy.run_script(__file__, models_root)
    failed = {k: v for k, v in results.items() if v != "ok"}
    assert set(results) == set(SCENARIOS) and not failed, "\n".join(failed.values())


def _main(comfy_dir: str, base: str) -> None:
    """In a fresh process: real ComfyUI on the CPU, the pack imported as ComfyUI imports it, every
    scenario run in turn; prints {scenario: "ok" | traceback} as the last line."""
    real_comfy.enter(comfy_dir, base)
    import comfy.model_management as mm
    results = {}
    for name, scenario in SCENARIOS.items():
        mm.unload_all_models()
        try:
            scenario(load_pack(f"cogvid_real_{name}"), mm)
            results[name] = "ok"
        except BaseException:                  # noqa: BLE001 - reported per scenario
            results[name] = f"{name}:\n{traceback.format_exc()}"
    print(json.dumps(results))


if __name__ == "__main__":
    _main(*sys.argv[1:3])
