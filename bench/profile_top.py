"""Summarise a py-spy collapsed-stack file: the functions with the most samples, self and inclusive.

.venv/bin/python bench/profile_top.py PROFILE [--top 25] [--filter mailgate]
"""

from __future__ import annotations

import argparse
import collections
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--filter", default="", help="inclusive view: only frames containing this")
    args = parser.parse_args()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                if args.filter in frame:
                    incl[frame] += n
    print(f"{total} samples")
    print("-- self")
    for frame, n in own.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {frame}")
    print("-- inclusive")
    for frame, n in incl.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
