"""Progress of a long preparation: documents done, tokens/s and ETA."""
import sys
import time

class Progress:
    """Documents done, tokens/s and ETA: a tqdm bar on a terminal, else a line on stdout every 30 s."""

    def __init__(self, n_docs: int):
        self.n_docs, self.start, self.tokens, self.docs, self.last = n_docs, time.time(), 0, 0.0, time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            tqdm.monitor_interval = 0  # no monitor thread: workers may still be forked (start_method)
            self.bar = tqdm(total=n_docs, unit="doc", dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n:,.0f}/{total_fmt} docs [{elapsed}<{remaining}{postfix}]")

    def update(self, docs: float, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.time() - self.start)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        elif time.time() - self.last >= 30:
            self.last = time.time()
            left = (self.n_docs - self.docs) * (time.time() - self.start) / max(self.docs, 1e-9)
            print(f"progress: {self.docs:,.0f}/{self.n_docs:,} documents, {self.tokens:,} tokens, "
                  f"{rate:,.0f} tokens/s, ETA {left / 60:.1f} min", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
