#!/usr/bin/env python3
"""Renders the Grafana dashboards to PNG from a live Prometheus: one image per dashboard, drawn
the way Grafana shows it to a user who opens it and keeps the first choice of every variable.

Usage (python of the set-up venv, with matplotlib):

    PY=$(bash scripts/manifest-tools.sh --render | tail -1)
    "$PY" scripts/render-dashboards.py --prometheus http://127.0.0.1:9090 --out DIR \\
        [--dashboards dashboards] [--minutes 10] [--rate-interval 1m] [--var node=node-3]

For each dashboards/*.json:
- the variables are resolved (resolve_variables): a variable with an All option takes All (its
  allValue, ".+" on our dashboards), any other the first of its values in the variable's sort
  order, from Prometheus' /api/v1/label/<label>/values for `label_values(selector, label)`.
  The hidden `cluster` variable is resolved like the others (to All); `datasource` is not a
  query and is left alone. --var NAME=VALUE wins.
- every query gets the values substituted (substitute), with $__rate_interval = --rate-interval
  (Grafana uses at least 4 scrape intervals; give 4x yours, default 1m);
- time series are queried over the last --minutes (/api/v1/query_range, ~200 points), stat and
  table panels at the present instant (/api/v1/query);
- the panels are drawn on Grafana's 24-column grid from their gridPos: rows as header bars,
  stat tiles (and gauges) as a big number in the panel's unit, coloured by the panel's
  thresholds or, without any, by Grafana's default ones (green; red from 80), time series as
  lines with the legendFormat's {{label}} filled in, tables as a small table. A panel without
  data (or with NaN only) says "No data", as Grafana does, inside an amber frame; a query
  Prometheus refused shows its error in a red one.
One line per panel on stdout: its number of series, NO DATA or ERROR. Exit status 0 unless
Prometheus cannot be reached or a dashboard cannot be drawn (unreadable JSON, a variable query
other than label_values); --strict also fails on panels without data or with query errors.

resolve_variables() and substitute() need neither matplotlib nor Prometheus; to reuse them:
    spec = importlib.util.spec_from_file_location("render_dashboards", "scripts/render-dashboards.py")
    rd = importlib.util.module_from_spec(spec); spec.loader.exec_module(rd)
    values = rd.resolve_variables(json.load(open(path)), lambda selector, label: [...])
    rd.substitute(expr, {**values, **rd.builtins(minutes, step, "1m")})
"""
import argparse
import glob
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# ---- Variables and substitution ----

# Grafana's Prometheus variable query `label_values(label)` or `label_values(selector, label)`.
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<sel>.+)\s*,\s*)?(?P<label>[A-Za-z_]\w*)\s*\)\s*$", re.S)
# $name, ${name}, ${name:format}, [[name]]; $__rate_interval and the other built-ins are names too.
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")


def substitute(expr, values):
    """`expr` with every variable that `values` ({name: text}) knows replaced; unknown ones are
    left as written, so Prometheus reports them."""
    def one(m):
        name = m[1] or m[2] or m[3]
        return values[name] if name in values else m[0]
    return VARIABLE.sub(one, expr)


def regex_escape(value):
    """A value inside a Prometheus =~ regex (RE2), as Grafana escapes multi-value variables."""
    return re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\1", value)


def sort_options(options, sort):
    """Grafana's variable sort: 1/2 alphabetical asc/desc, 3/4 numerical asc/desc, 5/6
    case-insensitive; 0 (none) keeps Prometheus' order, which is sorted too."""
    def number(s):
        m = re.search(r"-?\d+(\.\d+)?", s)
        return float(m[0]) if m else math.inf
    key = {3: number, 4: number, 5: str.lower, 6: str.lower}.get(sort, str)
    return sorted(options, key=key, reverse=sort in (2, 4, 6))


def resolve_variables(dashboard, label_values, overrides=None):
    """The value of every query variable of `dashboard` (the parsed JSON) for a user who keeps
    the first choice: All (the variable's allValue, else every value as a regex) when it has an
    All option, which Grafana lists first; otherwise the first value in the variable's sort
    order ("" when there is none). `label_values(selector or None, label)` returns a label's
    values; a variable's selector may use the variables before it. `overrides` {name: value}
    win. Returns {name: value} for substitute(); `datasource` variables are not included."""
    values = dict(overrides or {})
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        if name in values or var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else (query or var.get("definition", ""))
        m = LABEL_VALUES.match(query)
        if not m:
            raise ValueError(f"variable {name}: only label_values(...) queries are supported, not {query!r}")
        if var.get("includeAll") and var.get("allValue"):
            values[name] = var["allValue"]
            continue
        selector = substitute(m["sel"], values) if m["sel"] else None
        options = sorted(set(label_values(selector, m["label"])))
        if var.get("regex"):
            rx = re.compile(var["regex"].strip("/"))
            options = [(f[1] if rx.groups else x) for x in options if (f := rx.search(x))]
        options = sort_options(options, var.get("sort", 0))
        if var.get("includeAll"):
            values[name] = "(" + "|".join(regex_escape(o) for o in options) + ")"
        else:
            values[name] = options[0] if options else ""
    return values


def builtins(minutes, step, rate_interval):
    """Grafana's built-in variables for a dashboard showing the last `minutes`."""
    return {"__rate_interval": rate_interval, "__interval": f"{step}s", "__interval_ms": str(step * 1000),
            "__range": f"{minutes * 60}s", "__range_s": str(minutes * 60), "__range_ms": str(minutes * 60000)}


# ---- Prometheus ----

class QueryError(Exception):
    """Prometheus answered, and refused the query."""


class Prometheus:
    def __init__(self, url, timeout=30):
        self.url, self.timeout = url.rstrip("/"), timeout

    def get(self, path, params):
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            try:
                body = json.load(e)
            except ValueError:
                raise QueryError(f"HTTP {e.code} from {path}") from None
        if body.get("status") != "success":
            raise QueryError(body.get("error", "unknown error"))
        return body["data"]

    def label_values(self, start, end):
        """label_values(selector, label) over [start, end], for resolve_variables()."""
        def fetch(selector, label):
            params = [("start", f"{start:.3f}"), ("end", f"{end:.3f}")]
            if selector:
                params.append(("match[]", selector))
            return self.get(f"/api/v1/label/{label}/values", params)
        return fetch


LEGEND = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


def series_name(legend, labels, expr):
    """Grafana's series name: the legendFormat with {{label}} filled in, else name{labels}."""
    if legend:
        return LEGEND.sub(lambda m: labels.get(m[1], ""), legend)
    rest = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    name = labels.get("__name__", "")
    return f"{name}{{{rest}}}" if rest else (name or expr)


def query_panel(prom, panel, values, start, end, step):
    """[(name, labels, [(t, v)])] for every series of the panel's visible targets."""
    out = []
    for t in panel.get("targets", []):
        if t.get("hide") or not t.get("expr"):
            continue
        expr = substitute(t["expr"], values)
        if panel["type"] == "timeseries":
            data = prom.get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}",
                                                    "end": f"{end:.3f}", "step": step})
        else:
            data = prom.get("/api/v1/query", {"query": expr, "time": f"{end:.3f}"})
        result = data["result"]
        if data["resultType"] == "scalar":
            result = [{"metric": {}, "value": result}]
        for r in result:
            samples = r.get("values") or [r["value"]]
            out.append((series_name(t.get("legendFormat"), r["metric"], expr), r["metric"],
                        [(float(ts), float(v)) for ts, v in samples]))
    return out


# ---- Units (Grafana's formatting of the units our dashboards use) ----

def _num(v, unit_suffix=""):
    """Three significant digits, no exponent, no trailing zeros (9.75, 0.025, 1.5, 120)."""
    a = abs(v)
    decimals = 0 if a >= 100 or a == 0 else min(9, 2 - math.floor(math.log10(a)))
    text = f"{v:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return ("0" if text == "-0" else text) + unit_suffix


def _scaled(v, base, prefixes, suffix):
    i = 0
    while abs(v) >= base and i < len(prefixes) - 1:
        v, i = v / base, i + 1
    return _num(v) + " " + prefixes[i] + suffix if prefixes[i] or suffix else _num(v)


def format_value(v, unit):
    if v is None or math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if unit == "bytes":        # IEC
        return _scaled(v, 1024, ["", "Ki", "Mi", "Gi", "Ti", "Pi"], "B")
    if unit == "Bps":          # bytes/sec (SI)
        return _scaled(v, 1000, ["", "k", "M", "G", "T", "P"], "B/s")
    if unit == "percentunit":
        return _num(v * 100, "%")
    if unit == "bool_yes_no":
        return "Yes" if v else "No"
    if unit == "s":
        a = abs(v)
        for limit, div, name in [(1e-6, 1e-9, "ns"), (1e-3, 1e-6, "µs"), (1, 1e-3, "ms"), (60, 1, "s"),
                                 (3600, 60, "min"), (86400, 3600, "hour"), (604800, 86400, "day"),
                                 (31536000, 604800, "week")]:
            if a < limit:
                return _num(v / div, " " + name)
        return _num(v / 31536000, " year")
    if unit in ("reqps", "ops"):
        return _scaled(v, 1000, ["", "K", "M", "B", "T"], "") + (" req/s" if unit == "reqps" else " ops/s")
    return _num(v)             # "none" and anything else: the number, unscaled


# ---- Drawing ----

# Grafana's dark theme and its classic palette.
THEME = {"bg": "#111217", "panel": "#181b1f", "border": "#2c3037", "text": "#ccccdc", "dim": "#8e8e9a",
         "grid": "#2c3037", "row": "#22252b", "nodata": "#ff9900", "error": "#f2495c"}
PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0",
           "#37872D", "#FADE2A", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62", "#584477"]
# A panel without thresholds gets Grafana's default ones: green, red from 80 (raw value).
DEFAULT_STEPS = [{"color": "green", "value": None}, {"color": "red", "value": 80}]
NAMED = {"green": "#73BF69", "red": "#F2495C", "yellow": "#FADE2A", "orange": "#FF9830", "blue": "#5794F2"}

WIDTH = 1920                   # px; 24 columns of 80 px
UNIT_H = 38                    # px per gridPos height unit (Grafana: 30 px cell + 8 px margin)
HEADER = 70                    # px above the grid: title, variables, time range
PAD = 4                        # px between panels


class Canvas:
    """Pixel coordinates (top-left origin) onto a matplotlib figure."""

    def __init__(self, plt, height):
        self.plt, self.W, self.H = plt, WIDTH, height
        self.fig = plt.figure(figsize=(WIDTH / 100, height / 100), dpi=100, facecolor=THEME["bg"])

    def axes(self, left, top, width, height, **kw):
        return self.fig.add_axes([left / self.W, 1 - (top + height) / self.H, width / self.W, height / self.H], **kw)

    def text(self, x, y, s, **kw):
        self.fig.text(x / self.W, 1 - y / self.H, s, color=kw.pop("color", THEME["text"]), **kw)


def threshold_color(panel, v):
    steps = (panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds") or {}).get("steps") or DEFAULT_STEPS
    color = steps[0]["color"]
    for s in steps[1:]:
        if s.get("value") is not None and v >= s["value"]:
            color = s["color"]
    return NAMED.get(color, color)


def draw_frame(cv, p, box, state):
    left, top, width, height = box
    ax = cv.axes(left, top, width, height, facecolor=THEME["panel"])
    ax.set_xticks([]), ax.set_yticks([])
    edge = {"nodata": THEME["nodata"], "error": THEME["error"]}.get(state, THEME["border"])
    for s in ax.spines.values():
        s.set_color(edge), s.set_linewidth(2 if state else 1)
    cv.text(left + 8, top + 15, p["title"], fontsize=10, fontweight="bold", va="center")
    return ax


def draw_message(ax, text, color, size=13):
    ax.text(0.5, 0.45, text, transform=ax.transAxes, ha="center", va="center", color=color, fontsize=size, wrap=True)


def draw_stat(cv, p, box, series):
    left, top, width, height = box
    unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    shown = series[:8]
    n = len(shown)
    for i, (name, _, samples) in enumerate(shown):
        v = samples[-1][1]
        cell_w = (width - 16) / n
        cx = left + 8 + cell_w * (i + 0.5)
        size = max(11, min(30, int(cell_w / max(4, len(format_value(v, unit))) * 1.2), int((height - 30) / 2.2)))
        cv.text(cx, top + 30 + (height - 30) / 2 + (6 if n > 1 else 0), format_value(v, unit), fontsize=size,
                fontweight="bold", ha="center", va="center", color=threshold_color(p, v))
        if n > 1:
            cv.text(cx, top + 34, name[:int(cell_w / 6)], fontsize=7, ha="center", va="center", color=THEME["dim"])
    if len(series) > n:
        cv.text(left + width - 8, top + height - 8, f"+{len(series) - n} more", fontsize=7, ha="right", color=THEME["dim"])


def draw_timeseries(cv, p, box, series, start, end):
    from datetime import datetime, timezone

    import matplotlib.dates as mdates
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    left, top, width, height = box
    unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    # Legend as Grafana's bottom list: as many columns as fit, at most 3 lines.
    names = [s[0] for s in series]
    col_px = min(width - 20, max(len(n) for n in names) * 6 + 28)
    ncol = max(1, int((width - 20) // col_px))
    lines = min(3, math.ceil(len(names) / ncol))
    legend_h = lines * 15 + 6
    ax = cv.axes(left + 62, top + 30, width - 74, height - 30 - 22 - legend_h, facecolor=THEME["panel"])
    utc = timezone.utc
    for i, (name, _, samples) in enumerate(series):
        xs = [datetime.fromtimestamp(t, utc) for t, _ in samples]
        ax.plot(xs, [v for _, v in samples], color=PALETTE[i % len(PALETTE)], linewidth=1.2, label=name)
    ax.set_xlim(datetime.fromtimestamp(start, utc), datetime.fromtimestamp(end, utc))
    finite = [v for _, _, samples in series for _, v in samples if math.isfinite(v)]
    if finite and min(finite) >= 0:      # Grafana starts a non-negative axis at 0
        ax.set_ylim(0, max(finite) * 1.05 or 1)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=utc))
    ticks = mdates.AutoDateLocator(minticks=3, maxticks=max(4, int(width / 110)))
    ticks.intervald[mdates.MINUTELY] = [1, 2, 5, 10, 15, 30]    # 2 min: 8-minute ranges get 4 ticks
    ax.xaxis.set_major_locator(ticks)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, unit)))

    class UnitLocator(MaxNLocator):
        """Round ticks in the unit's scale (20 GiB, not 21474836480 B's neighbours)."""
        def tick_values(self, vmin, vmax):
            base = 1024 if unit == "bytes" else 1000
            scale = base ** max(0, math.floor(math.log(max(abs(vmin), abs(vmax), 1), base)))
            return super().tick_values(vmin / scale, vmax / scale) * scale
    ax.yaxis.set_major_locator(UnitLocator(nbins=max(2, int(ax.bbox.height / 40))))
    ax.tick_params(colors=THEME["dim"], labelsize=7, length=0)
    ax.grid(color=THEME["grid"], linewidth=0.6)
    for s in ax.spines.values():
        s.set_visible(False)
    keep = ncol * lines
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > keep:
        handles, labels = handles[:keep - 1], labels[:keep - 1] + [f"+{len(names) - keep + 1} more"]
        handles.append(Line2D([], [], color="none"))
    leg = ax.legend(handles, [l[:col_px // 6] for l in labels], loc="upper left", ncol=ncol, fontsize=7,
                    frameon=False, labelcolor=THEME["text"], handlelength=1.2, columnspacing=1.2,
                    bbox_to_anchor=(-62 / ax.bbox.width, -22 / ax.bbox.height))
    leg.set_in_layout(False)


def draw_table(cv, p, box, series):
    left, top, width, height = box
    keys = sorted({k for _, labels, _ in series for k in labels})
    cols = keys + ["Value"]
    unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    rows = [[labels.get(k, "") for k in keys] + [format_value(samples[-1][1], unit)] for _, labels, samples in series]
    fit = max(1, int((height - 30 - 22) // 20))
    more = len(rows) - fit
    rows = rows[:fit] if more <= 0 else rows[:fit - 1]
    widths = [max(len(c), *(len(r[i]) for r in rows)) + 2 for i, c in enumerate(cols)]
    total = sum(widths)
    x = left + 8
    for i, c in enumerate(cols):
        cv.text(x, top + 40, c, fontsize=8, fontweight="bold", va="center", color=THEME["dim"])
        for j, r in enumerate(rows):
            cv.text(x, top + 40 + 20 * (j + 1), r[i][:int((width - 16) * widths[i] / total / 6)], fontsize=8, va="center")
        x += (width - 16) * widths[i] / total
    if more > 0:
        cv.text(left + 8, top + 40 + 20 * (len(rows) + 1), f"… {more + 1} more rows", fontsize=8, va="center", color=THEME["dim"])


def render(prom, path, out_dir, minutes, rate_interval, overrides, log=print):
    """Renders one dashboard JSON to out_dir/<name>.png; returns [(title, type, state, n_series)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.load(open(path))
    end = time.time()
    start = end - minutes * 60
    step = max(1, round(minutes * 60 / 200))
    values = resolve_variables(board, prom.label_values(start, end), overrides)
    values.update(builtins(minutes, step, rate_interval))
    panels = sorted(board.get("panels", []), key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    bottom = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels), default=0)
    cv = Canvas(plt, HEADER + bottom * UNIT_H + PAD)
    shown = "   ".join(f"{v['name']}={values.get(v['name'], '')}" for v in board["templating"]["list"]
                       if v.get("type") == "query")
    cv.text(12, 22, board.get("title", os.path.basename(path)), fontsize=16, fontweight="bold", va="center")
    cv.text(12, 50, f"{shown}   $__rate_interval={rate_interval}   last {minutes} min to "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(end))} UTC   from {prom.url}",
            fontsize=9, va="center", color=THEME["dim"])
    report = []
    for p in panels:
        p = {**p, "title": substitute(p.get("title", ""), values)}     # Grafana fills in titles too
        g = p["gridPos"]
        col = WIDTH / 24
        box = (g["x"] * col + PAD, HEADER + g["y"] * UNIT_H + PAD, g["w"] * col - 2 * PAD, g["h"] * UNIT_H - 2 * PAD)
        if p["type"] == "row":
            ax = cv.axes(*box, facecolor=THEME["row"])
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            cv.text(box[0] + 10, box[1] + box[3] / 2, p["title"], fontsize=12, fontweight="bold", va="center")
            continue
        state, error, series = None, None, []
        try:
            series = query_panel(prom, p, values, start, end, step)
        except QueryError as e:
            state, error = "error", str(e)
        # A series of NaN only (histogram_quantile of no requests) draws nothing either.
        finite = any(math.isfinite(v) for _, _, samples in series for _, v in samples)
        if not state and not finite:
            state = "nodata"
        ax = draw_frame(cv, p, box, state)
        if state == "error":
            draw_message(ax, "Error: " + error[:300], THEME["error"], size=9)
            log(f"  {p['type']:<10} {p['title']}: ERROR {error}")
        elif state == "nodata":
            note = f" ({len(series)} series, NaN only)" if series else ""
            draw_message(ax, "No data" + note, THEME["dim"])
            log(f"  {p['type']:<10} {p['title']}: NO DATA{note}")
        else:
            draw = {"stat": lambda: draw_stat(cv, p, box, series),
                    "gauge": lambda: draw_stat(cv, p, box, series),   # the number, without the arc
                    "timeseries": lambda: draw_timeseries(cv, p, box, series, start, end),
                    "table": lambda: draw_table(cv, p, box, series)}
            draw.get(p["type"], lambda: draw_message(ax, f"({p['type']} panels are not drawn)", THEME["dim"]))()
            log(f"  {p['type']:<10} {p['title']}: {len(series)} series")
        report.append((p["title"], p["type"], state, len(series)))
    png = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    cv.fig.savefig(png, facecolor=THEME["bg"])
    plt.close(cv.fig)
    return png, report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", required=True, metavar="URL", help="e.g. http://127.0.0.1:9090")
    ap.add_argument("--out", required=True, metavar="DIR", help="where the PNGs go (created)")
    ap.add_argument("--dashboards", default=os.path.join(ROOT, "dashboards"), metavar="DIR",
                    help="directory of dashboard JSON (default: the repository's dashboards/)")
    ap.add_argument("--minutes", type=int, default=10, help="time range of the time series (default 10)")
    ap.add_argument("--rate-interval", default="1m", help="$__rate_interval: 4x the scrape interval (default 1m)")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="set a variable instead of resolving it (repeatable)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a panel has no data or a query error")
    args = ap.parse_args()
    overrides = dict(v.split("=", 1) for v in args.var)
    prom = Prometheus(args.prometheus)
    try:
        prom.get("/api/v1/status/buildinfo", {})
    except (urllib.error.URLError, OSError, QueryError) as e:
        sys.exit(f"Prometheus at {args.prometheus} does not answer: {e}")
    os.makedirs(args.out, exist_ok=True)
    paths = sorted(glob.glob(os.path.join(args.dashboards, "*.json")))
    if not paths:
        sys.exit(f"no dashboard JSON in {args.dashboards}")
    bad = failed = 0
    for path in paths:
        print(f"{os.path.basename(path)}:")
        try:
            png, report = render(prom, path, args.out, args.minutes, args.rate_interval, overrides)
        except (ValueError, KeyError, QueryError) as e:     # unreadable JSON, unsupported variable
            print(f"  FAILED: {e!r}")
            failed += 1
            continue
        empty = [r for r in report if r[2]]
        bad += len(empty)
        print(f"  -> {png}: {len(report)} panels, {sum(r[2] == 'nodata' for r in report)} without data, "
              f"{sum(r[2] == 'error' for r in report)} with query errors")
    sys.exit(1 if failed or (args.strict and bad) else 0)


if __name__ == "__main__":
    main()
