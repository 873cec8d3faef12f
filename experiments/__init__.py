"""Research studies on nlora (not speed benchmarks): the fine-tuning study on MiniLM-L6 / Rotten Tomatoes and
SmolLM2-135M / GSM-symbolic, the approximation study on real weights and the precision-policy loss study.
Their results live in ``experiments/results/``; the write-up is ``experiments/README.md``."""
