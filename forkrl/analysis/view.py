"""Token view: a self-contained HTML page with every response token coloured by its entropy.

Selected (top-rho) tokens are underlined; tokens outside the loss mask are faded. Hovering a token
shows its entropy, log-prob and, for dumps written by `forkrl analyze generate`, its top alternatives
with their probabilities (a small inline script fills one floating tooltip from `data-*` attributes; no
external resources). Opening the page as `view.html#tip=N` pins the tooltip of token N (screenshots, tests).

Trainer dumps (`train.dump_every`) carry the loss mode's tokens (`forkrl.training.dump`): with a `cov`
column a "colour by" selector switches the colouring from entropy to the covariance (blue negative,
red positive) and the tooltip shows it; with an `acted` column a checkbox outlines the tokens the mode
acted on (the meta's `acted` says what they are). Dumps without them show neither control.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from forkrl.analysis.dump import Dump
from forkrl.analysis.stats import show_token

# White -> yellow -> orange -> red, for H / H_scale in [0, 1].
_STOPS = [(0.0, (255, 255, 255)), (0.25, (255, 240, 170)), (0.6, (253, 174, 97)), (1.0, (215, 48, 39))]

_CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:.2em 0}
.meta{color:#555;font-size:.9em;margin-bottom:.6em}
.bar{display:flex;gap:1.5em;align-items:center;flex-wrap:wrap;font-size:.9em;margin:.6em 0 1em}
.legend{display:inline-block;width:180px;height:12px;border:1px solid #aaa;vertical-align:middle;
 background:linear-gradient(to right,#ffffff,#fff0aa 25%,#fdae61 60%,#d73027)}
.resp{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em .8em;margin:.6em 0}
.head{font-size:.85em;color:#555;margin-bottom:.35em}
.head .ok{color:#1a7f37;font-weight:600}.head .bad{color:#b42318;font-weight:600}
.prompt{font-family:ui-monospace,"DejaVu Sans Mono",monospace;color:#333}
.toks{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:15px;line-height:1.9;word-break:break-all}
.t{white-space:pre;padding:1px 0;border-bottom:2px solid transparent;cursor:default;background:var(--h)}
body.bycov .t{background:var(--c,#fff)}
body.markact .t.a{outline:2px solid #1f6feb;outline-offset:-1px}
.lcov{display:none}body.bycov .lcov{display:inline}body.bycov .lh{display:none}
.legend.cov{background:linear-gradient(to right,#2166ac,#ffffff 50%,#b2182b)}
body.marksel .t.s{border-bottom:2px solid #111}
.t.m{opacity:.45}
body.dim .t.lo{background:#fff !important;color:#bbb}
#tip{position:absolute;display:none;background:#222;color:#eee;font-size:12px;padding:.5em .7em;
 border-radius:5px;pointer-events:none;z-index:10;font-family:ui-monospace,"DejaVu Sans Mono",monospace;
 box-shadow:0 2px 8px rgba(0,0,0,.3);min-width:11em}
#tip table{border-collapse:collapse;margin-top:.3em}#tip td{padding:0 .5em 0 0}
#tip .p{text-align:right}#tip .cur{color:#ffd166}
"""

_JS = """
(function(){
  var tip=document.getElementById('tip');
  function esc(s){return s.replace(/&/g,'&amp;').replace(/</g,'&lt;').replace(/>/g,'&gt;');}
  function show(el){
    var d=el.dataset, h='token '+esc(d.tok)+'<br>H = '+d.h+' nats<br>log p = '+d.lp+(el.classList.contains('s')?'<br>selected (top-&rho;)':'');
    if(d.cov){h+='<br>cov = '+d.cov;}
    if(el.classList.contains('a')){h+='<br>acted on ('+esc(document.body.dataset.mode||'loss mode')+')';}
    if(d.alt){
      var alts=JSON.parse(d.alt), rows='';
      for(var i=0;i<alts.length;i++){
        var cur=alts[i][0]===d.tok?' class="cur"':'';
        rows+='<tr'+cur+'><td>'+esc(alts[i][0])+'</td><td class="p">'+(100*alts[i][1]).toFixed(1)+'%</td></tr>';
      }
      h+='<table>'+rows+'</table>';
    }
    tip.innerHTML=h; tip.style.display='block';
    var r=el.getBoundingClientRect(), left=window.scrollX+r.left;
    var maxLeft=window.scrollX+document.documentElement.clientWidth-tip.offsetWidth-8;
    tip.style.left=Math.max(4,Math.min(left,maxLeft))+'px';
    tip.style.top=(window.scrollY+r.bottom+4)+'px';
  }
  document.addEventListener('mouseover',function(e){
    var el=e.target.closest?e.target.closest('.t'):null; if(el){show(el);}
  });
  document.addEventListener('mouseout',function(e){
    if(e.target.closest&&e.target.closest('.t')&&!document.body.dataset.pinned){tip.style.display='none';}
  });
  document.getElementById('marksel').addEventListener('change',function(e){
    document.body.classList.toggle('marksel',e.target.checked);
  });
  var colour=document.getElementById('colour'), markact=document.getElementById('markact');
  if(colour){colour.addEventListener('change',function(e){
    document.body.classList.toggle('bycov',e.target.value==='cov');
  });}
  if(markact){markact.addEventListener('change',function(e){
    document.body.classList.toggle('markact',e.target.checked);
  });}
  var slider=document.getElementById('thr'), out=document.getElementById('thrv');
  function dim(){
    var x=parseFloat(slider.value); out.textContent=x.toFixed(3);
    document.body.classList.toggle('dim',x>0);
    var ts=document.querySelectorAll('.t');
    for(var i=0;i<ts.length;i++){ts[i].classList.toggle('lo',parseFloat(ts[i].dataset.h)<x);}
  }
  slider.addEventListener('input',dim);
  var m=/tip=(\\d+)/.exec(window.location.hash);
  if(m){var el=document.getElementById('t'+m[1]); if(el){document.body.dataset.pinned='1'; show(el);
    document.body.dataset.tipShown=tip.textContent;}}
})();
"""


def entropy_color(h: float, scale: float) -> str:
    """Background colour of a token with entropy h, on a ramp that saturates at `scale`.

    >>> entropy_color(0.0, 1.0), entropy_color(5.0, 1.0)
    ('#ffffff', '#d73027')
    """
    x = 0.0 if not math.isfinite(h) or scale <= 0 else min(1.0, max(0.0, h / scale))
    for (x0, c0), (x1, c1) in zip(_STOPS, _STOPS[1:]):
        if x <= x1:
            w = (x - x0) / (x1 - x0)
            return "#" + "".join(f"{round(a + w * (b - a)):02x}" for a, b in zip(c0, c1))
    return "#" + "".join(f"{c:02x}" for c in _STOPS[-1][1])


def _text(value) -> str:
    """Any dump value as escaped HTML text."""
    return html.escape(str(value))


def _number(value, spec: str) -> str:
    """A number formatted with `spec`; a value that is not a number (a crafted dump) as escaped text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return _text(value)


def cov_color(c: float, scale: float) -> str:
    """Background colour of a token with covariance c: blue (negative), white (0), red (positive),
    saturating at ``|c| = scale``.

    >>> cov_color(0.0, 1.0), cov_color(-2.0, 1.0), cov_color(1.0, 1.0)
    ('#ffffff', '#2166ac', '#b2182b')
    """
    x = 0.0 if not math.isfinite(c) or scale <= 0 else min(1.0, max(-1.0, c / scale))
    end = (178, 24, 43) if x > 0 else (33, 102, 172)
    return "#" + "".join(f"{round(255 + abs(x) * (e - 255)):02x}" for e in end)


def _token_html(
    idx: int,
    tok: str,
    h: float,
    lp: float,
    sel: bool,
    loss: bool,
    alts,
    scale: float,
    cov: float | None = None,
    acted: bool = False,
    cov_scale: float = 1.0,
) -> str:
    """One token's span; ``cov`` and ``acted`` for dumps with those columns."""
    classes = "t" + (" s" if sel else "") + ("" if loss else " m") + (" a" if acted else "")
    tok = str(tok)
    text = show_token(tok) if tok.strip() == "" or not tok.isprintable() else tok
    style = f"--h:{entropy_color(h, scale)}" + (
        f";--c:{cov_color(cov, cov_scale)}" if cov is not None else ""
    )
    attrs = f'id="t{idx}" class="{classes}" style="{style}"'
    attrs += f' data-h="{h:.4f}" data-lp="{lp:.4f}" data-tok="{html.escape(show_token(tok))}"'
    if cov is not None:
        attrs += f' data-cov="{cov:.4g}"'
    if alts is not None:
        data = json.dumps([[show_token(str(a)), round(float(p), 4)] for a, p in alts], ensure_ascii=False)
        attrs += f' data-alt="{html.escape(data)}"'
    out = f"<span {attrs}>{html.escape(text)}</span>"
    return out + ("<br>" if tok.endswith("\n") else "")


def _mode_controls(rows: list[dict], meta: dict) -> tuple[str, float | None, bool]:
    """The bar's controls for the `cov` / `acted` columns (empty for dumps without them), the
    covariance colour scale (the 99th percentile of |cov|; None: no `cov`) and whether `acted` is shown."""
    has_cov = bool(rows) and all(r.get("cov") is not None for r in rows)
    has_acted = bool(rows) and all(r.get("acted") is not None for r in rows)
    scale = None
    out = ""
    if has_cov:
        all_c = np.abs(np.concatenate([np.asarray(r["cov"], dtype=np.float64) for r in rows]))
        all_c = all_c[np.isfinite(all_c)]
        scale = float(np.percentile(all_c, 99)) if all_c.size else 1.0
        scale = scale if scale > 0 else 1.0
        out += (
            '<label>colour by <select id="colour"><option value="h" selected>entropy</option>'
            '<option value="cov">covariance (cov)</option></select></label>'
            f'<span class="lcov">cov &minus;{scale:.3g} <span class="legend cov"></span> +{scale:.3g}</span>'
        )
    if has_acted:
        what = _text(meta.get("acted", "the tokens the loss mode acted on"))
        mode = _text(meta.get("loss_mode", "the loss mode"))
        out += (
            f'<label title="{what}"><input type="checkbox" id="markact" checked> outline tokens {mode} '
            "acted on</label>"
        )
    return out, scale, has_acted


def render_view(dump: Dump, *, max_rows: int = 50, title: str = "forkrl token view") -> str:
    """The HTML page for the first `max_rows` responses of `dump`."""
    rows = dump.rows[:max_rows]
    all_h = (
        np.concatenate([np.asarray(r["entropy"], dtype=np.float64) for r in rows]) if rows else np.zeros(0)
    )
    scale = float(np.percentile(all_h, 99)) if all_h.size else 1.0
    scale = scale if scale > 0 else 1.0
    meta = " · ".join(f"{_text(k)} = {_text(v)}" for k, v in dump.meta.items())
    controls, cov_scale, has_acted = _mode_controls(rows, dump.meta)
    body = "marksel" + (" markact" if has_acted else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>",
        f'<body class="{body}" data-mode="{_text(dump.meta.get("loss_mode", ""))}">',
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="meta">{len(rows)} of {len(dump.rows)} responses{" · " + meta if meta else ""}</div>',
        '<div class="bar"><span class="lh">entropy 0 <span class="legend"></span> '
        f"{scale:.3g}+ nats</span>"
        '<label><input type="checkbox" id="marksel" checked> underline selected (top-&rho;) tokens</label>'
        f'<label>fade H &lt; <input type="range" id="thr" min="0" max="{scale:.4f}" step="{scale / 200:.5f}" '
        f'value="0"> <span id="thrv">0.000</span></label>{controls}</div>',
    ]
    idx = 0
    for i, r in enumerate(rows):
        head = f"#{i}"
        if r.get("step") is not None:
            head += f" · step {_text(r['step'])}"
        if r.get("reward") is not None:
            reward = r["reward"]
            cls = "ok" if isinstance(reward, (int, float)) and reward > 0.5 else "bad"
            head += f' · reward <span class="{cls}">{_number(reward, "g")}</span>'
        if r.get("adv") is not None:
            head += f" · adv {_number(r['adv'], '+.3f')}"
        n_sel = sum(bool(s) for s in r["sel"])
        head += f" · {len(r['tokens'])} tokens, {n_sel} selected"
        if has_acted:
            head += f", {sum(bool(a) for a in r['acted'])} acted on"
        if r.get("prompt"):
            head += f' · prompt <span class="prompt">{_text(r["prompt"])}</span>'
        toks = []
        alts_rows = r.get("top_tokens")
        for j, tok in enumerate(r["tokens"]):
            alts = None
            if alts_rows is not None:
                alts = list(zip(alts_rows[j], r["top_probs"][j]))
            cov = float(r["cov"][j]) if cov_scale is not None else None
            acted = has_acted and bool(r["acted"][j])
            toks.append(
                _token_html(
                    idx,
                    tok,
                    float(r["entropy"][j]),
                    float(r["logp"][j]),
                    bool(r["sel"][j]),
                    bool(r["loss"][j]),
                    alts,
                    scale,
                    cov,
                    acted,
                    cov_scale or 1.0,
                )
            )
            idx += 1
        parts.append(
            f'<div class="resp"><div class="head">{head}</div><div class="toks">{"".join(toks)}</div></div>'
        )
    parts += ['<div id="tip"></div>', f"<script>{_JS}</script>", "</body></html>"]
    return "\n".join(parts)


def write_view(dump: Dump, out: str | Path, **kwargs) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_view(dump, **kwargs), encoding="utf-8")
    return out
