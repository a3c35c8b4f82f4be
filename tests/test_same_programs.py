"""benchmarks/same_programs.py's comparison: programs that differ only in instruction numbers, source locations
and stack frames are the same; a changed shape or operation is not."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from same_programs import canonical  # noqa: E402

BASE = """HloModule jit_f, entry_computation_layout={(f32[2,4]{1,0})->f32[2,4]{1,0}}

FileNames
1 "/tmp/a/ktjax/kv/cache.py"

ENTRY %main.7 (p.1: f32[2,4]) -> f32[2,4] {
  %p.1 = f32[2,4]{1,0} parameter(0), metadata={op_name="x" source_file="/tmp/a/ktjax/kv/cache.py" source_line=3}
  %iota.12 = s32[2,4]{1,0} iota(), iota_dimension=1, stack_frame_id=4
  ROOT %add.3 = f32[2,4]{1,0} add(%p.1, %p.1)
}
"""


@pytest.mark.parametrize("other,same", [
    (BASE, True),
    (BASE.replace("iota.12", "iota.30").replace("/tmp/a/", "/work/b/").replace("stack_frame_id=4", "stack_frame_id=9")
     .replace("source_line=3", "source_line=40"), True),
    (BASE.replace("iota_dimension=1", "iota_dimension=0"), False),
    (BASE.replace("f32[2,4]{1,0} add", "f32[2,4]{0,1} add"), False),
    (BASE.replace("add(%p.1, %p.1)", "multiply(%p.1, %p.1)"), False),
])
def test_canonical_programs(other, same):
    assert (canonical(BASE) == canonical(other)) is same
