# scratch: the streams row of check_host_paths must fail with `elsewhere` forced False
set -x; mkdir -p /tmp/bak && cp -r flashmoe_py /tmp/bak/
sed -i 's/^        elsewhere = current is not None and self.lent_on != current$/        elsewhere = False/' flashmoe_py/backends/flash.py
diff -r /tmp/bak/flashmoe_py flashmoe_py | grep "^[<>]"
timeout -k 10 240 python3 tests/gpu/check_host_paths.py --out $OUT/host_mutated.json > $OUT/host_mutated.log 2>&1; echo "mutated rc=$? (must be 1)"
grep -o '"case": "[^"]*"\|"ok": [a-z]*\|"rel_err": [0-9.e-]*' $OUT/host_mutated.json | paste - - - | tail -n 8
rm -rf flashmoe_py && cp -r /tmp/bak/flashmoe_py .
