"""Plain-text tables for terminal output."""

import re


def table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if c.replace(".", "").replace("-", "").replace("e", "").isdigit()
                               else c.ljust(w) for c, w in zip(r, widths)).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


_AT_NODE = re.compile(r" at node '([^']*)'")


def by_reason(items) -> list[list]:
    """Rows [amount, places, reason, first node] for (reason, amount) pairs, one row per reason
    once its node name is taken out, so that one barrier repeated through a network takes one line."""
    rows: dict[str, list] = {}
    for reason, amount in items:
        m = _AT_NODE.search(reason)
        key = reason.replace(m.group(0), "") if m else reason
        row = rows.setdefault(key, [0, []])
        row[0] += amount
        row[1].append(m.group(1) if m else None)
    out = []
    for key, (amount, nodes) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        named = [n for n in nodes if n]
        where = f"{named[0]}" + (f" and {len(named) - 1} more" if len(named) > 1 else "") if named else "-"
        out.append([amount, len(nodes), key, where])
    return out
