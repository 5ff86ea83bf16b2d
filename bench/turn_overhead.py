"""Gateway overhead per turn: 250 -> POST at the API, and turn end -> reply at the relay (fast sandbox).

    .venv/bin/python bench/turn_overhead.py [--mails 100] [--profile FILE]

Times come from three processes on one clock (time.time()): the SMTP client (the 250), the sandbox (the
POST's arrival, the turn's end) and the relay (the reply's arrival). Baseline for scale: the sandbox's
own time for the turn (POST -> turn end), measured in the same run.
"""

from __future__ import annotations

import argparse
import sys

from _common import (
    child,
    gateway_env,
    gateway_main,
    header,
    make_mail,
    ms,
    pct,
    peers_main,
    profiled,
    smtp_load,
    verdict,
    wait_until,
    workdir,
)

TARGET_P50 = 0.020


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=100)
    parser.add_argument("--pace", type=float, default=0.1, help="seconds between mails (one session)")
    parser.add_argument("--profile", help="py-spy the gateway while the mails go through")
    args = parser.parse_args()
    header("Gateway overhead per turn (fast sandbox)")
    with workdir() as tmp, child(peers_main, 0.0, 15.0, str(tmp / "peers.log")) as peers:
        url, relay_port = peers.info
        env = gateway_env(tmp, url, relay_port)
        with child(gateway_main, env, str(tmp / "gateway.log"), False) as gate:
            mails = [(f"turn-{i}", make_mail(f"turn-{i}")) for i in range(args.mails)]
            with profiled(gate.pid, args.profile):
                load = smtp_load(gate.info, mails, 1, keep_replies=True, pace=args.pace)
                n = load.sent
                wait_until(lambda: peers.call("counts")["relayed"] >= n, 60, f"{n} replies")
            records = peers.call("records")
    accepted = {tag: t for t, tag, _ in load.replies}
    posted: dict[str, tuple[float, str, int]] = {}
    for t, task_id, seq, text in records["posts"]:
        tag = text.split("Please look at item ", 1)[1].split(".", 1)[0]
        posted[tag] = (t, task_id, seq)
    relayed = {irt.strip("<>").split("@")[0]: t for t, irt in records["relayed"]}
    to_post, to_reply, api_turn = [], [], []
    for tag, t250 in accepted.items():
        t_post, task_id, seq = posted[tag]
        end = records["ends"][(task_id, seq)]
        to_post.append(t_post - t250)
        to_reply.append(relayed[tag] - end)
        api_turn.append(end - t_post)
    print(f"   {len(accepted)} mails, one at a time every {args.pace:g} s")
    print(f"   250 -> POST at the API:     p50 {ms(pct(to_post, 50))}  p99 {ms(pct(to_post, 99))}")
    print(f"   turn end -> reply at relay: p50 {ms(pct(to_reply, 50))}  p99 {ms(pct(to_reply, 99))}")
    print(
        f"   baseline, the API's own turn (POST -> end): p50 {ms(pct(api_turn, 50))}  "
        f"p99 {ms(pct(api_turn, 99))}"
    )
    ok = pct(to_post, 50) <= TARGET_P50 and pct(to_reply, 50) <= TARGET_P50
    print(f"   target p50 <= {ms(TARGET_P50)} each: {verdict(ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
