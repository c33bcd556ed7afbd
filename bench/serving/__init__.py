"""``scalellm bench``: a serving benchmark for any OpenAI-compatible server, after ``vllm bench serve``.

The logic lives in plain classes, each tested on its own: the prompts (datasets.py, with
exact-length text from tokens.py), when each request is sent (arrivals.py), and what the
results mean (metrics.py). client.py is the thin HTTP part (httpx, streaming), runner.py
drives one run or a sweep, report.py prints and saves the results, plot.py compares result
files, server_metrics.py reads the server's own histograms from /metrics, and cli.py is the
command line.
"""
