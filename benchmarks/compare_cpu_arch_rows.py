"""The rows of benchmarks/compare_cpu_arch.sh's table for one round: the medians of the fused CPU
backend and of torch.compile from that round's bench_loss.csv, per thread count and batch size.

    python benchmarks/compare_cpu_arch_rows.py BENCH_LOSS_CSV ARCH ROUND
"""

import csv
import sys


def main() -> None:
    path, arch, round_number = sys.argv[1:]
    medians = {}
    with open(path) as results:
        for row in csv.DictReader(results):
            if row["status"] == "ok":
                medians[(int(row["threads"]), int(row["batch"]), row["provider"])] = float(row["median_ms"])
    for threads, batch in sorted({key[:2] for key in medians}):
        cpu, compiled = medians.get((threads, batch, "cpu")), medians.get((threads, batch, "compile"))
        ratio = f"{compiled / cpu:.2f}x" if cpu and compiled else "-"
        shown = [f"{value:.2f}" if value else "-" for value in (cpu, compiled)]
        print(f"| {arch} | {round_number} | {threads} | {batch} | {shown[0]} | {shown[1]} | {ratio} |")


if __name__ == "__main__":
    main()
