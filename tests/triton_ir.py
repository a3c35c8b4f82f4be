"""Lower a jitted Pallas call for CUDA on this CPU and collect the Triton modules it produced (no GPU needed)."""
from jax import export


def triton_modules(fn, *shapes) -> list:
    """The Triton modules that exporting `fn` at `shapes` for CUDA lowers (their MLIR can then be verified)."""
    from jax._src.pallas.triton import lowering

    modules, original = [], lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module)
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        export.export(fn, platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    return modules
