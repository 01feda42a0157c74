# scratch: the frozen-expert step before (ad2ccb5's package) and after (this tree), alternated, one GPU
for round in 1 2; do
  for tree in .variants/ad2ccb5 .; do
    tag=$([ "$tree" = . ] && echo new || echo old)
    (cd $tree && timeout 200 torchrun --nproc-per-node 1 bench/layer.py --backends flash \
       --preset qwen3_30b_a3b mixtral_8x7b --tokens 4096 --fwd-bwd --frozen-experts --iters 20 --input-sets 2 \
       --out $OUT/ab_${tag}_$round.json > $OUT/ab_${tag}_$round.log 2>&1); echo "$tag round $round rc=$?"
    grep "+bwd" $OUT/ab_${tag}_$round.log
  done
done
