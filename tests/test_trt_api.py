"""The TensorRT Python API this project calls, checked on a CPU against the real bindings a GPU user gets.

`make setup` installs the `tensorrt` wrapper and the real `tensorrt_bindings` module (Python only, no native
libraries) of TensorRT 11.4 and 10.15 into $(VENV)/trt-api/<major>, outside site-packages: the other tests need
`import tensorrt` to fail. The bindings import once libnvinfer, libnvinfer_plugin and libnvonnxparser resolve,
so stand-ins built with gcc from tests/trt_stubs.c go on LD_LIBRARY_PATH. Per TensorRT version, one subprocess
runs this file as a script (pytest's process never imports tensorrt) and writes a JSON report; the tests assert
on its parts:
  api      every tensorrt / tensorrt.plugin / polygraphy name the project's source uses (an ast scan) exists and
           takes the arguments it is called with; so do the methods called on TensorRT objects;
  facts    the TensorRT 11 changes the code relies on, so that a drift shows up;
  plugins  both flf2v plugins register, and tensorrt.plugin's own AOT plugin class runs their autotune and
           aot_impl callbacks as TensorRT would, for the 14B shapes, on stand-in shape expressions (real
           TensorDesc, ShapeExpr, KernelLaunchParams; a stand-in expression builder) and for an H200 (sm_90,
           232,448 B of shared memory per block): every tactic offered fits and its PTX, with the capped PTX
           ISA, assembles with ptxas.
"""
import ast
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import traceback
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRT_API = Path(sys.prefix) / "trt-api"  # $(VENV)/trt-api, filled by `make setup`
VERSIONS = {"11": "11.4.", "10": "10.15."}  # folder -> the version it must hold
STUBS = {"nvinfer": "NVINFER", "nvinfer_plugin": "NVINFER_PLUGIN", "nvonnxparser": "NVONNXPARSER"}
SOURCES = ("export", "runtime", "kernels", "bench")
ROOTS = ("tensorrt", "polygraphy")

# Methods called on TensorRT and polygraphy objects, which the ast scan cannot type: (class, member, positional
# arguments, or None for a property). runtime/trt_backend.py loads engines and sets dynamic shapes; export/trt_engine.py
# sets profile shapes.
METHODS = [("tensorrt.Runtime", "deserialize_cuda_engine", 1),
           ("tensorrt.ICudaEngine", "create_execution_context", 0),
           ("tensorrt.ICudaEngine", "num_io_tensors", None),
           ("tensorrt.ICudaEngine", "get_tensor_name", 1),
           ("tensorrt.ICudaEngine", "get_tensor_shape", 1),
           ("tensorrt.ICudaEngine", "get_tensor_dtype", 1),
           ("tensorrt.ICudaEngine", "get_tensor_mode", 1),
           ("tensorrt.ICudaEngine", "num_optimization_profiles", None),
           ("tensorrt.ICudaEngine", "streamable_weights_size", None),
           ("tensorrt.ICudaEngine", "weight_streaming_budget_v2", None),
           ("tensorrt.IExecutionContext", "set_tensor_address", 2),
           ("tensorrt.IExecutionContext", "set_input_shape", 2),
           ("tensorrt.IExecutionContext", "set_optimization_profile_async", 2),
           ("tensorrt.IExecutionContext", "execute_async_v3", 1),
           ("polygraphy.backend.trt.Profile", "add", 4)]
# Calls the scan must find (a scan that silently finds nothing would pass).
MUST_CALL = {"tensorrt.Runtime", "tensorrt.Logger", "tensorrt.plugin.register", "tensorrt.plugin.autotune",
             "tensorrt.plugin.aot_impl", "tensorrt.plugin.AutoTuneCombination", "tensorrt.plugin.KernelLaunchParams",
             "polygraphy.backend.trt.network_from_onnx_path", "polygraphy.backend.trt.CreateConfig",
             "polygraphy.backend.trt.engine_bytes_from_network", "polygraphy.backend.trt.Profile"}

# The 14B DiT at 720p, 81 frames: batch 2 (CFG), 75,600 tokens, dim 5120 in 40 heads of 128, 512 text tokens and
# 514 CLIP image tokens; the plugins compile for an H200.
B, L, DIM, HEADS, TEXT, IMAGE = 2, 75600, 5120, 40, 512, 514
SM, MAX_SHARED = 90, 232448
KINDS = [("self", "bf16"), ("self", "fp32"), ("cross", "bf16"), ("cross", "fp32"), ("sage", "bf16")]
PLUGIN_NAMES = {"self": "wan_self_attention", "cross": "wan_cross_attention", "sage": "wan_sage_attention"}


# ---- the probe: runs in a subprocess with the bindings on PYTHONPATH ---------------------------------

def _scan():
    """Attribute chains and calls on names bound to tensorrt or polygraphy in the project's source:
    ({"tensorrt.Logger.WARNING": "runtime/trt_backend.py:187", ...}, [(name, n_args, keywords, where), ...])."""
    chains, calls = {}, []
    for path in sorted(p for d in SOURCES for p in (ROOT / d).glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        alias = {}  # local name -> dotted name it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in ROOTS:
                        alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in ROOTS:
                for a in node.names:
                    alias[a.asname or a.name] = f"{node.module}.{a.name}"

        def dotted(node):
            parts = []
            while isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id in alias:
                return ".".join([alias[node.id], *reversed(parts)])
            return None

        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Attribute, ast.Name)) and dotted(node):
                chains.setdefault(dotted(node), where)
            if isinstance(node, ast.Call) and dotted(node.func) and all(k.arg for k in node.keywords) \
                    and not any(isinstance(a, ast.Starred) for a in node.args):
                calls.append((dotted(node.func), len(node.args), [k.arg for k in node.keywords], where))
    return chains, calls


def _resolve(name: str):
    """The object a dotted name refers to: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(name)


def _split_params(text: str) -> list:
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "([{<") - (ch in ")]}>")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in out + [cur] if p.strip()]


def _accepts(obj, n_args: int, keywords=(), method=False) -> str:
    """'' if obj (a method taken from its class if `method`) can be called with n_args positional arguments and
    these keywords, else why not."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a pybind11 function or class: its overloads are in the docstring
        fn = obj.__init__ if inspect.isclass(obj) else obj
        overloads = re.findall(rf"^(?:\d+\. )?{fn.__name__}\((.*)\) ->", fn.__doc__ or "", re.M)
        for params in overloads:
            params = [(re.match(r"\**\w+", p).group(), " = " in p) for p in _split_params(params)]
            params = [p for p in params if p[0] != "self"]
            names = [n for n, _ in params]
            required = [n for n, default in params if not default and not n.startswith("*")]
            if (n_args <= len(names) or "*args" in names) and set(keywords) <= set(names) | {"**kwargs"} \
                    and set(required) <= set(names[:n_args]) | set(keywords):
                return ""
        return f"no overload of {fn.__name__} takes {n_args} positional + {list(keywords)}: {overloads}"
    try:
        sig.bind(*range(n_args + method), **dict.fromkeys(keywords))
    except TypeError as err:
        return f"{sig}: {err}"
    if inspect.isclass(obj) and any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        # keywords passed on through **kwargs (polygraphy's CreateConfig): a base class must name them
        bases = [inspect.signature(c.__init__).parameters for c in obj.__mro__ if "__init__" in c.__dict__]
        lost = [k for k in keywords if not any(k in p for p in bases)]
        if lost:
            return f"{sig}: no base class of {obj.__name__} takes {lost}"
    return ""


def _probe_api(trt, trtp):
    chains, calls = _scan()
    missing = {}
    for name, where in sorted(chains.items()):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as err:
            missing[name] = f"{where}: {err}"
    bad_calls = {}
    for name, n_args, keywords, where in calls:
        if name not in missing and (why := _accepts(_resolve(name), n_args, keywords)):
            bad_calls[f"{name}({n_args} args, {keywords}) at {where}"] = why
    methods = {}
    for owner, member, n_args in METHODS:
        cls = _resolve(owner)
        attr = inspect.getattr_static(cls, member, None)
        if attr is None:
            methods[f"{owner}.{member}"] = "missing"
        elif n_args is None:
            methods[f"{owner}.{member}"] = "" if isinstance(attr, property) or not callable(attr) else "not a property"
        else:
            methods[f"{owner}.{member}"] = _accepts(getattr(cls, member), n_args, method=True)
    import polygraphy
    import polygraphy.backend.trt.loader as loader
    return {"chains": sorted(chains), "called": sorted({c[0] for c in calls}), "missing": missing,
            "bad_calls": bad_calls, "methods": methods, "polygraphy": polygraphy.__version__,
            "polygraphy_tensorrt": loader.trt.__file__}


def _probe_facts(trt, trtp):
    flag_doc = dict(re.findall(r"^\s+(\w+) : (.*)$", trt.NetworkDefinitionCreationFlag.__doc__ or "", re.M))
    return {"builder_flags": sorted(trt.BuilderFlag.__members__),
            "creation_flags": {n: flag_doc.get(n, "") for n in trt.NetworkDefinitionCreationFlag.__members__},
            "ShapeExpr.constant_value": type(inspect.getattr_static(trtp.ShapeExpr, "constant_value")).__name__,
            "ShapeExpr.is_constant": type(inspect.getattr_static(trtp.ShapeExpr, "is_constant")).__name__,
            "ICudaEngine binding members": [m for m in dir(trt.ICudaEngine) if "binding" in m],
            # runtime/trt_backend.py sets the budget of a STREAM=1 engine: any non-negative bytes, settable
            "weight_streaming_budget_v2 settable": getattr(inspect.getattr_static(
                trt.ICudaEngine, "weight_streaming_budget_v2"), "fset", None) is not None,
            # runtime/trt_backend.py hands deserialize_cuda_engine an mmap of the plan: any buffer must do
            "deserialize_cuda_engine(buffer)": bool(re.search(
                r"deserialize_cuda_engine\(self: [\w.]+, \w+: [\w.]*[Bb]uffer\)",
                trt.Runtime.deserialize_cuda_engine.__doc__ or ""))}


class _Expr:
    """Stand-in for trt.IDimensionExpr: a known value, a build-time constant or not (a dynamic dimension)."""

    def __init__(self, value: int, constant: bool = True):
        self.value, self.constant = value, constant

    def is_constant(self):
        return self.constant

    def get_constant_value(self):
        return self.value

    def is_size_tensor(self):
        return False


class _ExprBuilder:
    """Stand-in for trt.IExprBuilder, which only TensorRT's builder can create."""

    def __init__(self, trt):
        op = trt.DimensionOperation
        self.ops = {op.SUM: int.__add__, op.SUB: int.__sub__, op.PROD: int.__mul__, op.FLOOR_DIV: int.__floordiv__,
                    op.CEIL_DIV: lambda a, b: -(-a // b), op.MAX: max, op.MIN: min,
                    op.EQUAL: lambda a, b: int(a == b), op.LESS: lambda a, b: int(a < b)}

    def constant(self, value):
        return _Expr(value)

    def operation(self, op, a, b):
        return _Expr(self.ops[op](a.value, b.value), a.constant and b.constant)


class _Registry:
    """Stand-in for trt.get_plugin_registry(): the real one is libnvinfer's."""

    def __init__(self):
        self.creators = {}

    def register_creator(self, creator, namespace):
        self.creators[(creator.name, namespace)] = creator
        return True

    def get_creator(self, name, version, namespace):
        return self.creators.get((name, namespace))


class _SymExprSetter(dict):
    """Stand-in for TensorRT's setter of the kernel's extra arguments."""
    nbSymExprs = 0


def _describe(x):
    if type(x).__name__ == "TensorDesc":
        shape = tuple(x.shape) if x.has_shape else None
        return f"TensorDesc(dtype={x.dtype}, shape_expr=[{type(x.shape_expr[0]).__name__}], shape={shape})"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__}[{', '.join(sorted({_describe(e) for e in x}))}]"
    return type(x).__name__


def _compile(job):
    """In a worker process: compile one kernel into Triton's disk cache, where the probe then finds it."""
    from triton.backends.compiler import GPUTarget

    from flf2v.kernels import trt_plugin
    trt_plugin._kernel(*job, GPUTarget("cuda", SM, 32))


def _probe_plugins(trt, trtp):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    from flf2v.kernels import trt_plugin

    # Stand-ins for what only TensorRT's builder provides (this process only): the plugin registry, dimension
    # expressions (tensorrt.plugin checks for trt.IDimensionExpr) and their C++ holders (DimsExprs, ISymExpr).
    registry = _Registry()
    trt.get_plugin_registry = lambda: registry
    trt.IDimensionExpr = _Expr
    trt.DimsExprs = lambda n: [None] * n
    sys.modules[trtp.SymInt32.__module__].SymExprImpl = lambda expr: expr
    target = GPUTarget("cuda", SM, 32)
    trt_plugin.build_target = lambda: (target, MAX_SHARED)
    # Triton compiles hold the GIL: compile the configs (8 + 4 + 2 + 6, seconds each) in processes first
    jobs = [(kind, dtype, DIM, HEADS, t) for kind, dtype in KINDS
            for t in range(1, len(trt_plugin.tactic_configs(kind, dtype)) + 1)]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(4, os.cpu_count() or 1), mp_context=spawn) as pool:
        list(pool.map(_compile, jobs))

    trt_plugin.register_plugins()
    report = {"registered": sorted([name, ns, c.plugin_version, sorted(f.name for f in c.field_names)]
                                   for (name, ns), c in registry.creators.items()),
              "max_shared": MAX_SHARED, "ptx_isa": trt_plugin.ptx_isa(SM), "runs": {}}
    act = {"bf16": trt.bfloat16, "fp32": trt.float32}
    builder = _ExprBuilder(trt)
    ptxas = []
    for kind, dtype in KINDS:
        name = PLUGIN_NAMES[kind]
        run = report["runs"][f"{kind}/{dtype}"] = {}
        try:
            if kind == "self":
                inputs = [((B, L, DIM), act[dtype])] * 3 + [((DIM,), act[dtype])] * 2 \
                    + [((L, DIM // HEADS // 2), trt.float32)] * 2 + [((B, L), trt.float32)] * 2
            elif kind == "sage":  # int8 codes and fp32 block scales of q (128 rows) and k (64 rows), then v
                inputs = [((B, L, DIM), trt.int8), ((B, HEADS, -(-L // 128)), trt.float32),
                          ((B, L, DIM), trt.int8), ((B, HEADS, -(-L // 64)), trt.float32), ((B, L, DIM), act[dtype])]
            else:
                inputs = [((B, L, DIM), act[dtype])] + [((B, TEXT, DIM), act[dtype])] * 2 \
                    + [((B, IMAGE, DIM), act[dtype])] * 2
            # what TensorRT does with a plugin node: create the plugin from the node's attributes ...
            fields = trt.PluginFieldCollection([trt.PluginField("num_heads", np.array([HEADS], np.int32),
                                                                trt.PluginFieldType.INT32)])
            plugin = registry.get_creator(name, "1", "flf2v").create_plugin(
                name, "flf2v", fields, trt.TensorRTPhase.BUILD, trt.QuickPluginCreationRequest.STRICT_AOT)
            run["plugin_class"] = type(plugin).__name__
            seen = {}

            def spy(key, fn):
                def wrapped(*args):
                    seen[key] = [_describe(a) for a in args]
                    return fn(*args)
                return wrapped

            plugin.autotune_function = spy("autotune", plugin.autotune_function)
            plugin.aot_impl_function = spy("aot_impl", plugin.aot_impl_function)
            # ... output types and shapes (batch and length dynamic: only the model dim must be static) ...
            run["output_types"] = [str(t) for t in plugin.get_output_data_types(
                [t for _, t in inputs], [len(s) for s, _ in inputs])]
            exprs = [[_Expr(n, constant=n in (DIM, DIM // HEADS // 2)) for n in s] for s, _ in inputs]
            run["output_shape"] = [e.value for e in plugin.get_output_shapes(exprs, [], builder)[0]]
            # ... the type/format combinations and tactics (the autotune callback) ...
            io = []
            for shape, dt in inputs + [((B, L, DIM), act[dtype])]:
                d = trt.DynamicPluginTensorDesc()
                d.desc.dims, d.desc.type, d.desc.format = trt.Dims(shape), dt, trt.TensorFormat.LINEAR
                d.min = d.opt = d.max = trt.Dims(shape)
                io.append(d)
            combos = plugin.get_supported_format_combinations(io, len(inputs))
            run["combinations"] = [[str(c.type) for c in combos[i:i + len(io)]]
                                   for i in range(0, len(combos), len(io))]
            plugin.configure_plugin(io[:-1], io[-1:])
            run["tactics"] = sorted(plugin.get_valid_tactics())
            # ... and per tactic, the kernel and its launch (the aot_impl callback), as TensorRT times them
            run["launches"] = {}
            for tactic in run["tactics"]:
                plugin.set_tactic(tactic)
                launch, extra = types.SimpleNamespace(), _SymExprSetter()
                plugin.get_launch_params(exprs, io, len(inputs), launch, extra, builder)
                kname, ptx = plugin.get_kernel([d.desc for d in io[:-1]], [io[-1].desc])
                value = {k: getattr(launch, k)._expr.value for k in
                         ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")}
                config = trt_plugin.tactic_configs(kind, dtype)[tactic - 1]
                path = Path(os.environ["FLF2V_PROBE_TMP"]) / f"{kind}-{dtype}-{tactic}.ptx"
                path.write_bytes(ptx)
                ptxas.append((run, tactic, subprocess.Popen(
                    [get_ptxas(SM).path, f"-arch=sm_{SM}a", str(path), "-o", os.devnull],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
                run["launches"][tactic] = {
                    "kernel": kname.decode(), "ptx_version": re.search(rb"^\.version (\S+)", ptx, re.M)[1].decode(),
                    "ptx_target": re.search(rb"^\.target (\S+)", ptx, re.M)[1].decode(),
                    "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
                    "grid": [value["grid_x"], value["grid_y"], value["grid_z"]],
                    "block": [value["block_x"], value["block_y"], value["block_z"]],
                    "shared": value["shared_mem"],
                    "extra": [[extra[i]._expr.value, extra[i]._expr.constant] for i in range(extra.nbSymExprs)]}
            run["callbacks"] = seen
            kernel = trt_plugin._kernel(kind, dtype, DIM, HEADS, run["tactics"][0], target)
            run["args"] = [p.name for p in kernel.src.fn.params if not p.is_constexpr]
            run["shared_all"] = {t: trt_plugin._kernel(kind, dtype, DIM, HEADS, t, target).metadata.shared
                                 for t in range(1, len(trt_plugin.tactic_configs(kind, dtype)) + 1)}
        except Exception:
            run["error"] = traceback.format_exc()
    for run, tactic, proc in ptxas:
        out = proc.communicate()[0]
        run["launches"][tactic]["ptxas"] = "ok" if proc.returncode == 0 else out[-2000:] or f"rc {proc.returncode}"
    return report


def _probe(out: Path) -> int:
    import tensorrt as trt
    import tensorrt.plugin as trtp
    report = {"version": trt.__version__, "tensorrt": trt.__file__}
    for part, fn in (("api", _probe_api), ("facts", _probe_facts), ("plugins", _probe_plugins)):
        try:
            report[part] = fn(trt, trtp)
        except Exception:
            report[part] = {"error": traceback.format_exc()}
    out.write_text(json.dumps(report, indent=1))
    return 0


# ---- the tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(VERSIONS), ids=lambda v: f"trt{v}")
def probe(request, tmp_path_factory):
    major = request.param
    folder = TRT_API / major
    if not (folder / "tensorrt_bindings").is_dir() or not (folder / "tensorrt").is_dir():
        pytest.fail(f"{folder}: no TensorRT {VERSIONS[major]}x Python bindings there: run `make setup`", pytrace=False)
    tmp = tmp_path_factory.mktemp(f"trt{major}")
    for lib, macro in STUBS.items():
        cmd = ["gcc", "-shared", "-fPIC", f"-D{macro}", f"-Wl,-soname,lib{lib}.so.{major}",
               "-o", str(tmp / f"lib{lib}.so.{major}"), str(Path(__file__).with_name("trt_stubs.c"))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"building the TensorRT stand-in libraries failed: {' '.join(cmd)}\n{r.stderr}"
    path = lambda *p: os.pathsep.join(str(x) for x in p if x)  # noqa: E731
    env = {**os.environ, "PYTHONPATH": path(folder, os.environ.get("PYTHONPATH")),
           "LD_LIBRARY_PATH": path(tmp, os.environ.get("LD_LIBRARY_PATH")), "TRITON_INTERPRET": "0",
           "FLF2V_PROBE_TMP": str(tmp)}
    r = subprocess.run([sys.executable, __file__, str(tmp / "report.json")], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and (tmp / "report.json").exists(), \
        f"the TensorRT {major} probe failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    report = json.loads((tmp / "report.json").read_text())
    assert report["version"].startswith(VERSIONS[major]), f"{folder} holds TensorRT {report['version']}"
    assert Path(report["tensorrt"]).is_relative_to(folder), report["tensorrt"]
    return report


def part(report, name):
    assert "error" not in report[name], f"TensorRT {report['version']}, {name}:\n{report[name].get('error')}"
    return report[name]


def test_project_names_exist(probe):
    """Every tensorrt / tensorrt.plugin / polygraphy name in export, runtime, kernels, bench exists, and every
    call on them takes the arguments given."""
    api = part(probe, "api")
    assert not api["missing"] and not api["bad_calls"], \
        f"TensorRT {probe['version']} lacks names the project uses:\n" + \
        "".join(f"  {k}  ({v})\n" for k, v in api["missing"].items()) + \
        "and calls them with arguments they do not take:\n" + \
        "".join(f"  {k}: {v}\n" for k, v in api["bad_calls"].items())
    assert MUST_CALL <= set(api["called"]), f"the source scan missed {sorted(MUST_CALL - set(api['called']))}"
    assert {"tensorrt.Logger.WARNING", "tensorrt.bfloat16", "tensorrt.plugin.SymInt32"} <= set(api["chains"])


def test_methods_on_trt_objects(probe):
    api = part(probe, "api")
    bad = {k: v for k, v in api["methods"].items() if v}
    assert not bad, f"TensorRT {probe['version']}: methods the runtime or build call are gone or changed:\n" + \
        "\n".join(f"  {k}: {v}" for k, v in bad.items())


def test_polygraphy_imports_against_the_bindings(probe):
    api = part(probe, "api")
    assert api["polygraphy_tensorrt"] == probe["tensorrt"], "polygraphy did not load the bindings under test"


def test_tensorrt_facts(probe):
    """What the code relies on per version: weak typing gone in 11 (build.py sets no precision flags, passes
    strongly_typed only while the flag exists), ShapeExpr.constant_value a method (trt_plugin._static_dim)."""
    facts, major = part(probe, "facts"), int(probe["version"].split(".")[0])
    assert facts["ShapeExpr.constant_value"] == "function" and facts["ShapeExpr.is_constant"] == "property", facts
    assert "STRONGLY_TYPED" in facts["creation_flags"], facts["creation_flags"]
    assert not facts["ICudaEngine binding members"], facts["ICudaEngine binding members"]
    assert "WEIGHT_STREAMING" in facts["builder_flags"] and facts["weight_streaming_budget_v2 settable"], facts
    assert facts["deserialize_cuda_engine(buffer)"], "Runtime.deserialize_cuda_engine takes no buffer (an mmap)"
    precision = {"FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
    if major >= 11:
        assert not precision & set(facts["builder_flags"]), f"precision BuilderFlags back in {probe['version']}"
        assert "DEPRECATED" in facts["creation_flags"]["STRONGLY_TYPED"], facts["creation_flags"]
        assert "EXPLICIT_BATCH" not in facts["creation_flags"], facts["creation_flags"]
    else:
        assert precision <= set(facts["builder_flags"]), facts["builder_flags"]


def test_plugins_register(probe):
    plugins = part(probe, "plugins")
    assert plugins["registered"] == [["wan_cross_attention", "flf2v", "1", ["num_heads"]],
                                     ["wan_sage_attention", "flf2v", "1", ["num_heads"]],
                                     ["wan_self_attention", "flf2v", "1", ["num_heads"]]], plugins["registered"]


RUNS = [f"{kind}/{dtype}" for kind, dtype in KINDS]


def _run(probe, key):
    run = part(probe, "plugins")["runs"][key]
    assert "error" not in run, f"TensorRT {probe['version']}, {key} plugin callbacks failed:\n{run['error']}"
    return run


def _expected_args(kind: str) -> dict:
    """The kernels' int32 arguments (between inputs and outputs, TensorRT's AOT order) for contiguous tensors."""
    lengths = {"q": L, "k": L, "v": L} if kind in ("self", "sage") else {"q": L, "kt": TEXT, "vt": TEXT, "ki": IMAGE,
                                                                         "vi": IMAGE}
    args = {"L": L, "LQ": L, "LT": TEXT, "LI": IMAGE, "H": HEADS}
    for t, n in lengths.items():
        args[f"stride_{t}b"], args[f"stride_{t}l"] = n * DIM, DIM
    return args


@pytest.mark.parametrize("key", RUNS)
def test_plugin_callbacks_run(probe, key):
    """tensorrt.plugin's AOT plugin class runs autotune and aot_impl for the 14B shapes; the launch matches the
    kernel's signature, grid and block."""
    run, kind = _run(probe, key), key.split("/")[0]
    dtype = {"bf16": "DataType.BF16", "fp32": "DataType.FLOAT"}[key.split("/")[1]]
    n_in = 9 if kind == "self" else 5
    assert run["plugin_class"] == "_TemplateAOTPlugin"
    assert run["output_types"] == [dtype] and run["output_shape"] == [B, L, DIM], run
    types = {"self": [dtype] * 5 + ["DataType.FLOAT"] * 4 + [dtype], "cross": [dtype] * 6,
             "sage": ["DataType.INT8", "DataType.FLOAT"] * 2 + [dtype] * 2}[kind]
    assert run["combinations"] == [types], f"{key}: autotune offered {run['combinations']}"
    assert run["tactics"], f"{key}: no tactic offered"
    # (inputs, num_heads, outputs) and (inputs, num_heads, outputs, tactic); num_heads a one-element int32 array
    assert [run["callbacks"]["autotune"][n_in], run["callbacks"]["aot_impl"][n_in], run["callbacks"]["aot_impl"][-1]] \
        == ["ndarray", "ndarray", "int"], run["callbacks"]
    ints = run["args"][n_in:-1]
    want = _expected_args(kind)
    for tactic, launch in run["launches"].items():
        got = dict(zip(ints, [v for v, _ in launch["extra"]]))
        assert len(launch["extra"]) == len(ints) and got == {a: want[a] for a in ints}, \
            f"{key} tactic {tactic}: extra int args {got}, kernel wants {ints} = {[want[a] for a in ints]}"
        cfg = launch["config"]
        assert launch["grid"] == [-(-L // cfg["BLOCK_M"]), B * HEADS, 1], \
            f"{key} tactic {tactic}: grid {launch['grid']}"
        assert launch["block"] == [cfg["num_warps"] * 32, 1, 1], f"{key} tactic {tactic}: block {launch['block']}"


@pytest.mark.parametrize("key", RUNS)
def test_plugin_tactics_fit_hopper(probe, key):
    """Every tactic offered for sm_90 launches on an H200 (shared memory per block), its PTX has the capped ISA
    (older drivers refuse newer PTX) and assembles for sm_90a; fp32 offers its one config."""
    run, plugins = _run(probe, key), part(probe, "plugins")
    cap = plugins["ptx_isa"]
    assert cap is not None and cap <= 84, f"PTX ISA for sm_90 is {cap}: R550 drivers know up to 8.4"
    over = {t: n for t, n in run["shared_all"].items() if n > MAX_SHARED}
    assert not set(over) & set(map(str, run["tactics"])), \
        f"{key}: tactics {sorted(over)} need {over} B of shared memory > {MAX_SHARED} B, offered: {run['tactics']}"
    if key.endswith("fp32"):
        assert run["tactics"] == [1], f"{key}: fp32 has one config, offered {run['tactics']}"
    else:
        assert run["tactics"] == [int(t) for t, n in run["shared_all"].items() if n <= MAX_SHARED], run
    for tactic, launch in run["launches"].items():
        assert launch["shared"] <= MAX_SHARED, f"{key} tactic {tactic}: {launch['shared']} B > {MAX_SHARED} B"
        assert launch["shared"] == run["shared_all"][tactic], (launch["shared"], run["shared_all"])
        assert launch["ptx_version"] == f"{cap // 10}.{cap % 10}" and launch["ptx_target"] == "sm_90a", \
            f"{key} tactic {tactic}: PTX .version {launch['ptx_version']} .target {launch['ptx_target']}, " \
            f"want {cap // 10}.{cap % 10} sm_90a"
        assert launch["ptxas"] == "ok", f"{key} tactic {tactic}: ptxas -arch=sm_90a failed:\n{launch['ptxas']}"
    print(f"TensorRT {probe['version']} {key}: shared memory per tactic {run['shared_all']}, offered {run['tactics']}")


if __name__ == "__main__":
    sys.exit(_probe(Path(sys.argv[1])))
