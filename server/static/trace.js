// alignserve playground: the decision trace of one answer, drawn from its `alignment` block.
//
// Reads what the API reports (docs/playground.md lists the fields): the candidates with their
// score terms, the KL bound and estimate, the win-rate bound, latency, and each strategy's own
// fields. Where the block names the chosen candidate, the pruning point of a track or a block's
// candidates, those are shown as reported; where it does not, the page reconstructs them from
// the reported fields and says so (a "reconstructed" note), never silently.
"use strict";

(function () {
  const page = () => window.AlignPage;
  const KNOWN = new Set(["strategy", "n", "reward", "cost", "kl_bound", "kl_estimate",
    "win_rate_bound", "generated_tokens", "scored_candidates", "latency", "cost_weight",
    "candidates", "warnings"]);

  // ------------------------------------------------------------ score terms

  function weight(a) {
    return typeof a.cost_weight === "number" ? a.cost_weight : 1.0;
  }

  // reward − cost_weight·cost, the score every selection strategy ranks by (null: unscored).
  function objectiveOf(c, a) {
    if (typeof c.objective === "number") return c.objective;
    if (c.reward === null || c.reward === undefined) return null;
    return c.reward - (c.cost === null || c.cost === undefined ? 0 : weight(a) * c.cost);
  }

  function isPruned(c, a) {
    if (typeof c.pruned === "boolean") return c.pruned;
    if (c.pruned_at !== undefined && c.pruned_at !== null) return true;
    return a.strategy === "speculative_rejection" && c.finish_reason === null;
  }

  // The returned candidate: the one the block marks `chosen`, else the best-scoring one whose
  // text is the answer's (equal texts can only differ in score by ties).
  function chosenIndex(cands, a, content) {
    const flagged = cands.findIndex((c) => c.chosen === true);
    if (flagged >= 0 || cands.some((c) => c.chosen === false)) return flagged;
    let best = -1;
    cands.forEach((c, i) => {
      if (isPruned(c, a)) return;
      const same = c.text === content || (content === "" && c.reward === a.reward);
      if (!same) return;
      if (best < 0 || (objectiveOf(c, a) ?? -Infinity) > (objectiveOf(cands[best], a) ?? -Infinity)) {
        best = i;
      }
    });
    return best;
  }

  // softmax(objective / λ): soft best-of-n's selection probabilities (reported ones win).
  function selectionProbs(cands, a, body) {
    if (cands.every((c) => typeof c.probability === "number")) return cands.map((c) => c.probability);
    if (a.strategy !== "soft_best_of_n") return null;
    const lam = Number(body.alignment.selection_temperature ?? body.alignment.temperature ??
      page().optionDefault("soft_best_of_n", "selection_temperature") ?? 1.0);
    const obj = cands.map((c) => objectiveOf(c, a) ?? -Infinity);
    const top = Math.max(...obj);
    const w = obj.map((o) => Math.exp((o - top) / lam));
    const total = w.reduce((x, y) => x + y, 0);
    return w.map((x) => x / total);
  }

  // ------------------------------------------------------------ speculative rejection

  // Decision points as reported (`decision_points`), else rebuilt from the options and the
  // per-point rejection counts (`rejected`), by the schedule of decoding/speculative_rejection.py:
  // "growth" d, d + ⌈g·d⌉, ...; "memory" p' = ⌈p·|pool|/|kept|⌉.
  function decisionPoints(a, body) {
    if (Array.isArray(a.decision_points)) {
      return { reported: true, points: a.decision_points.map(
        (d) => (typeof d === "number" ? { tokens: d } : d)) };
    }
    if (!Array.isArray(a.rejected)) return null;
    const opt = (k) => body.alignment[k] ?? page().optionDefault(a.strategy, k);
    // a growth factor implies its schedule (the strategy's Options do the same)
    const given = body.alignment;
    const memory = (given.schedule ?? (given.growth != null ? "growth"
      : page().optionDefault(a.strategy, "schedule"))) === "memory";
    const growth = Number(opt("growth") ?? 2);
    let point = Number(opt("decision_tokens"));
    if (!(point > 0)) return null; // unset: the server derived it (first_decision); not rebuilt
    let stretch = point;
    let pool = a.n;
    const points = a.rejected.map((r) => {
      const p = { tokens: point, pool, kept: pool - r, rejected: r };
      if (memory) {
        point = Math.ceil((point * pool) / (pool - r));
      } else {
        stretch = Math.max(1, Math.ceil(stretch * growth));
        point += stretch;
      }
      pool -= r;
      return p;
    });
    return { reported: false, points };
  }

  // Index of the decision point that pruned each candidate (null: it survived). Reported
  // (`pruned_at`: a point index, or each point's `pruned` track indices) or, failing that,
  // reconstructed: unfinished tracks (finish_reason null) in order of tokens decoded (one
  // pruned earlier decoded fewer before its abort), then, for the slots left (tracks that had
  // finished when rejected keep their finish reason), the lowest-scoring finished tracks.
  function prunedAt(cands, a, dp, chosen) {
    const out = cands.map(() => null);
    if (cands.some((c) => typeof c.pruned_at === "number")) {
      cands.forEach((c, i) => { if (typeof c.pruned_at === "number") out[i] = c.pruned_at; });
      return { reported: true, at: out };
    }
    if (dp.points.length && dp.points.every((p) => Array.isArray(p.pruned))) {
      dp.points.forEach((p, k) => p.pruned.forEach((i) => { out[i] = k; }));
      return { reported: true, at: out };
    }
    const idx = cands.map((c, i) => i);
    const unfinished = idx.filter((i) => cands[i].finish_reason === null)
      .sort((i, j) => cands[i].tokens - cands[j].tokens || i - j);
    const finished = idx.filter((i) => cands[i].finish_reason !== null && i !== chosen)
      .sort((i, j) => (objectiveOf(cands[i], a) ?? -Infinity) - (objectiveOf(cands[j], a) ?? -Infinity) || i - j);
    dp.points.forEach((p, k) => {
      let count = p.rejected ?? (p.pool - p.kept);
      while (count > 0 && unfinished.length) { out[unfinished.shift()] = k; count -= 1; }
      for (let m = 0; count > 0 && m < finished.length; m += 1) {
        const i = finished[m];
        if (out[i] === null && cands[i].tokens <= p.tokens) { out[i] = k; count -= 1; }
      }
      for (let m = 0; count > 0 && m < finished.length; m += 1) {
        if (out[finished[m]] === null) { out[finished[m]] = k; count -= 1; }
      }
    });
    return { reported: false, at: out };
  }

  // A track's score at a decision point, when the point reports them (`scores`: [[track,
  // score], ...] or {track: score}).
  function scoreAt(point, track) {
    if (Array.isArray(point.scores)) {
      const hit = point.scores.find((x) => x[0] === track);
      return hit ? hit[1] : undefined;
    }
    return point.scores ? point.scores[track] : undefined;
  }

  function pruningView(cands, a, body, chosen, dp, pr) {
    const { el, svg, fmt } = page();
    const order = cands.map((c, i) => i).sort((i, j) => {
      const pi = pr.at[i] ?? Infinity;
      const pj = pr.at[j] ?? Infinity;
      return pj - pi || (objectiveOf(cands[j], a) ?? -Infinity) - (objectiveOf(cands[i], a) ?? -Infinity);
    });
    const maxTok = Math.max(body.max_tokens || 0, ...cands.map((c) => c.tokens), 1);
    const W = 720;
    const left = 44;
    const right = 84;
    const top = 34;
    const h = Math.max(5, Math.min(18, Math.floor(360 / cands.length)));
    const H = top + h * cands.length + 10;
    const x = (t) => left + (Math.min(t, maxTok) / maxTok) * (W - left - right);
    const pic = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
      "aria-label": "tracks over decision points" });
    dp.points.forEach((p) => {
      const px = x(p.tokens);
      pic.append(svg("line", { class: "decision", x1: px, x2: px, y1: 24, y2: H - 6 }));
      pic.append(svg("text", { class: "decision-label", x: px, y: 11 }, `${p.tokens} tok`));
      if (p.pool !== undefined) {
        pic.append(svg("text", { class: "decision-label", x: px, y: 23 }, `${p.pool}→${p.kept}`));
      }
    });
    order.forEach((i, row) => {
      const c = cands[i];
      const y = top + row * h + h / 2;
      const k = pr.at[i];
      const kind = i === chosen ? "chosen" : k !== null ? "pruned" : "finished";
      // a track rejected after it finished stays eligible (and may be the answer)
      const partial = dp.points.map((p) => [p.tokens, scoreAt(p, i)])
        .filter(([, v]) => v !== undefined).map(([t, v]) => `${t}: ${fmt(v, 3)}`);
      const g = svg("g", { class: `track ${kind}`, "data-track": i },
        svg("title", {}, `#${i} · ${c.tokens} tokens · reward ${fmt(c.reward, 3)}` +
          (k !== null ? ` · pruned at ${dp.points[k].tokens} tokens` : "") +
          (partial.length ? ` · scores at points ${partial.join(", ")}` : "") +
          `\n${c.text.slice(0, 300)}`));
      const cut = k !== null ? dp.points[k].tokens : c.tokens;
      g.append(svg("text", { class: "track-label", x: left - 6, y: y + 4 }, `#${i}`));
      g.append(svg("line", { class: "run", x1: x(0), x2: x(Math.min(cut, c.tokens)), y1: y, y2: y }));
      if (k !== null) {
        if (c.tokens > cut) {
          g.append(svg("line", { class: "overrun", x1: x(cut), x2: x(c.tokens), y1: y, y2: y }));
        }
        const cx = x(cut);
        const r = Math.min(4, h / 2 - 1);
        g.append(svg("path", { class: "cross",
          d: `M${cx - r},${y - r}L${cx + r},${y + r}M${cx - r},${y + r}L${cx + r},${y - r}` }));
      } else {
        g.append(svg("circle", { class: "end", cx: x(c.tokens), cy: y, r: Math.min(4, h / 2 - 1) }));
      }
      g.append(svg("text", { class: "score", x: W - right + 6, y: y + 4 },
        `${fmt(c.reward, 2)}${i === chosen ? " ✓" : ""}`));
      pic.append(g);
    });
    const table = el("table", { class: "grid points" },
      el("thead", {}, el("tr", {}, ...["point", "tokens", "pool", "kept", "pruned"].map(
        (t) => el("th", { text: t })))),
      el("tbody", {}, ...dp.points.map((p, k) => el("tr", {},
        el("td", { text: String(k + 1) }), el("td", { text: fmt(p.tokens) }),
        el("td", { text: fmt(p.pool) }), el("td", { text: fmt(p.kept) }),
        el("td", { text: fmt(p.rejected ?? (p.pool - p.kept)) })))));
    const notes = [];
    if (!dp.reported) notes.push("decision points rebuilt from the options and `rejected`");
    if (!pr.reported) notes.push("which track fell at which point: assigned by tokens decoded");
    return el("div", { class: "pruning" },
      el("h3", { text: "Speculative rejection: tracks over decision points" }),
      el("p", { class: "legend", text: "green: returned · blue: finished · red ×: pruned " +
        "(faded tail: tokens decoded before the abort) · right: reward" }),
      pic, table,
      notes.length ? el("p", { class: "note", text: `reconstructed: ${notes.join("; ")}` }) : null);
  }

  // ------------------------------------------------------------ tables

  function candidatesTable(cands, a, body, chosen, dp, pr) {
    const { el, fmt } = page();
    const probs = selectionProbs(cands, a, body);
    const obj = cands.map((c) => objectiveOf(c, a));
    // out of the running: unfinished when pruned (their score judged a partial answer)
    const out = (i) => i !== chosen && (pr ? pr.at[i] !== null && cands[i].finish_reason === null
      : isPruned(cands[i], a));
    const order = cands.map((c, i) => i).sort((i, j) => Number(out(i)) - Number(out(j)) ||
      (obj[j] ?? -Infinity) - (obj[i] ?? -Infinity) || i - j);
    const cols = ["rank", "#", "objective", "reward", "cost", ...(probs ? ["p(select)"] : []),
      "tokens", "log p", "end", "text"];
    const rows = order.map((i, r) => {
      const c = cands[i];
      const pruned = pr && pr.at[i] !== null;
      const end = pruned ? `${c.finish_reason ? `${c.finish_reason}, ` : ""}pruned @ ` +
        `${dp.points[pr.at[i]].tokens}` : isPruned(c, a) ? "pruned" : (c.finish_reason ?? "—");
      const cells = [String(c.rank ?? r + 1), String(i), fmt(obj[i]), fmt(c.reward), fmt(c.cost),
        ...(probs ? [fmt(probs[i], 3)] : []), fmt(c.tokens), fmt(c.logprob, 2), end];
      const tr = el("tr", { class: i === chosen ? "chosen" : (pr ? pruned : isPruned(c, a))
        ? "pruned" : "", "data-index": i, "data-objective": obj[i] ?? "" },
      ...cells.map((t) => el("td", { text: t })),
      el("td", { class: "text" }, i === chosen ? el("span", { class: "badge", text: "chosen" }) : null,
        el("span", { text: c.text })));
      return tr;
    });
    return el("div", {},
      el("h3", { text: `Candidates ranked (${cands.length})` }),
      el("table", { class: "grid candidates" },
        el("thead", {}, el("tr", {}, ...cols.map((t) => el("th", { text: t })))),
        el("tbody", {}, ...rows)));
  }

  function klBar(a) {
    const { el, svg, fmt } = page();
    if (typeof a.kl_bound !== "number" || a.kl_bound <= 0) return null;
    const W = 320;
    const frac = typeof a.kl_estimate === "number" ? Math.min(1, a.kl_estimate / a.kl_bound) : 0;
    const pic = svg("svg", { viewBox: `0 0 ${W} 22`, width: W, height: 22, class: "kl-bar",
      role: "img", "aria-label": "KL estimate against its bound" },
    svg("rect", { class: "bound", x: 0, y: 4, width: W, height: 14 }),
    svg("rect", { class: "estimate", x: 0, y: 4, width: W * frac, height: 14 }));
    return el("div", { class: "kl" }, pic, el("span", { text:
      ` KL estimate ${fmt(a.kl_estimate)} of bound ${fmt(a.kl_bound)} nats` }));
  }

  function summary(a, body, res) {
    const { el, fmt } = page();
    const lat = a.latency || {};
    const rows = [
      ["strategy", a.strategy], ["n", a.n], ["reward", a.reward], ["cost", a.cost],
      ["cost_weight", a.cost_weight], ["objective", objectiveOf(a, a)],
      ["kl_bound", a.kl_bound], ["kl_estimate", a.kl_estimate],
      ["win_rate_bound", a.win_rate_bound], ["generated_tokens", a.generated_tokens],
      ["scored_candidates", a.scored_candidates],
      ["completion_tokens", res.usage ? res.usage.completion_tokens : null],
      ["latency.generate_s", lat.generate_s], ["latency.score_s", lat.score_s],
      ["latency.total_s", lat.total_s], ["first_text_s (browser)", res.firstToken],
      ["elapsed_s (browser)", res.elapsed],
    ];
    // every other field, except lists of records (drawn by otherTraces)
    const extras = Object.entries(a).filter(([k, v]) => !KNOWN.has(k) && k !== "decision_points" &&
      !(Array.isArray(v) && v.some((x) => typeof x === "object" && x !== null)));
    return el("table", { class: "grid summary" }, el("tbody", {},
      ...[...rows, ...extras].map(([k, v]) => el("tr", {
        "data-key": k, "data-value": typeof v === "number" ? String(v) : v == null ? "" : fmt(v) },
      el("th", { text: k }), el("td", { text: fmt(v) })))));
  }

  // Per-strategy lists the page has no special view for (blocks, token steps, ...): a table.
  function otherTraces(a) {
    const { el, fmt } = page();
    const out = [];
    for (const [k, v] of Object.entries(a)) {
      if (KNOWN.has(k) || k === "decision_points" || !Array.isArray(v)) continue;
      if (!v.length || typeof v[0] !== "object" || v[0] === null) continue;
      if (v.every((x) => Array.isArray(x.candidates))) { out.push(blocksView(k, v)); continue; }
      const cols = [...new Set(v.flatMap((x) => Object.keys(x)))];
      out.push(el("div", { class: `trace-${k}` }, el("h3", { text: k }),
        el("table", { class: "grid" },
          el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", { text: c })))),
          el("tbody", {}, ...v.map((row) => el("tr", {},
            ...cols.map((c) => el("td", { text: fmt(row[c]) }))))))));
    }
    return out;
  }

  // Blockwise CD: each block's K candidates side by side, the kept one marked.
  function blocksView(key, blocks) {
    const { el, fmt } = page();
    return el("div", { class: "blocks", "data-key": key },
      el("h3", { text: `Blocks (${blocks.length}): each block's candidates, the kept one marked` }),
      ...blocks.map((b, k) => el("div", { class: "block" },
        el("span", { class: "block-n", text: `block ${k + 1}` }),
        ...(b.candidates || []).map((c, i) => el("div", {
          class: `block-cand${i === b.kept || c.kept ? " kept" : ""}` },
        el("span", { class: "value", text: fmt(c.value ?? c.score, 3) }),
        el("span", { text: c.text ?? "" }))))));
  }

  function render(panel, body, res) {
    const { el } = page();
    const a = res.alignment;
    if (!a) {
      panel.append(el("p", { class: "note", text: "the answer carries no alignment block" }));
      return;
    }
    const cands = a.candidates || [];
    const chosen = chosenIndex(cands, a, res.content);
    panel.dataset.chosen = String(chosen);
    const parts = [el("h3", { text: "Accounting" }), summary(a, body, res), klBar(a)];
    if (a.warnings) parts.push(el("ul", { class: "warnings" }, ...a.warnings.map((w) => el("li", { text: w }))));
    const dp = a.strategy === "speculative_rejection" || a.decision_points
      ? decisionPoints(a, body) : null;
    const pr = dp ? prunedAt(cands, a, dp, chosen) : null;
    if (dp) parts.push(pruningView(cands, a, body, chosen, dp, pr));
    if (cands.length) parts.push(candidatesTable(cands, a, body, chosen, dp, pr));
    if (typeof a.blocks === "number") {
      parts.push(el("p", { class: "note", text: `${a.blocks} block(s) of ${a.block_tokens} ` +
        "tokens kept; this server reports no per-block candidates" }));
    }
    parts.push(...otherTraces(a));
    panel.append(el("section", { class: "trace" }, ...parts.filter(Boolean)));
  }

  // A against B: reward, KL, tokens and time next to each other.
  function compare(results) {
    const { el, fmt } = page();
    const table = document.querySelector("#compare-table");
    const pick = (side, f) => (results[side] ? f(results[side]) : null);
    const al = (r) => r.res.alignment || {};
    const rows = [
      ["strategy", (r) => r.body.alignment.strategy], ["n", (r) => al(r).n],
      ["reward", (r) => al(r).reward], ["objective", (r) => objectiveOf(al(r), al(r))],
      ["kl_bound", (r) => al(r).kl_bound], ["kl_estimate", (r) => al(r).kl_estimate],
      ["win_rate_bound", (r) => al(r).win_rate_bound],
      ["generated_tokens", (r) => al(r).generated_tokens],
      ["completion_tokens", (r) => (r.res.usage ? r.res.usage.completion_tokens : null)],
      ["latency.total_s", (r) => (al(r).latency || {}).total_s],
      ["elapsed_s (browser)", (r) => r.res.elapsed],
    ];
    table.replaceChildren(
      el("thead", {}, el("tr", {}, el("th", { text: "" }), el("th", { text: "A" }), el("th", { text: "B" }))),
      el("tbody", {}, ...rows.map(([k, f]) => el("tr", { "data-key": k },
        el("th", { text: k }), el("td", { text: fmt(pick("a", f)) }),
        el("td", { text: fmt(pick("b", f)) })))));
    document.querySelector("#compare-box").hidden = false;
  }

  window.AlignTrace = { render, compare, objectiveOf, chosenIndex, decisionPoints, prunedAt };
}());
