"""A benchmark's results table, printed and, with --results, appended to that markdown file (bench/RESULTS.md),
so that the committed tables name the command and the machine that produced them."""


def publish(text, results=None):
    print(text)
    if results:
        with open(results, "a") as f:
            f.write("\n" + text + "\n")
