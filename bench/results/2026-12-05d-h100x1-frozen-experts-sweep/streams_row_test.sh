# scratch: the interleaved streams row, as is and with `elsewhere` forced False
cat > /tmp/row.py <<'PY'
import json, os, sys
sys.path.insert(0, "tests/gpu"); sys.path.insert(0, "tests")
import torch, flashmoe_py as fm
import check_host_paths as h
from seeds import fresh_seed
fm.init(heap_bytes=h.heap_bytes_for(h.WIDE, 1, 2048, "p2p"))
seed = fresh_seed(); inputs = h.Inputs(seed)
for k in range(3):
    print(json.dumps(h.forwards_on_two_streams_then_backwards(inputs, seed + k)), flush=True)
fm.finalize()
PY
timeout 200 python3 /tmp/row.py 2>&1 | grep case
mkdir -p /tmp/bak && cp -r flashmoe_py /tmp/bak/
sed -i 's/^        elsewhere = current is not None and self.lent_on != current$/        elsewhere = False/' flashmoe_py/backends/flash.py
diff -r /tmp/bak/flashmoe_py flashmoe_py | grep "^[<>]"
echo "--- mutated (must fail):"
timeout 200 python3 /tmp/row.py 2>&1 | grep case
rm -rf flashmoe_py && cp -r /tmp/bak/flashmoe_py .
