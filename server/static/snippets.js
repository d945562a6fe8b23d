// alignserve playground: the exact request as a shell command (curl) or Python (openai SDK).
// The key is never written out: both read it from $ALIGNSERVE_API_KEY.
"use strict";

(function () {
  function shellQuote(s) {
    return `'${s.replace(/'/g, "'\\''")}'`;
  }

  function curlOf(body) {
    return [`curl -sN ${location.origin}/v1/chat/completions`,
      `  -H "Authorization: Bearer $ALIGNSERVE_API_KEY"`,
      "  -H 'Content-Type: application/json'",
      `  -d ${shellQuote(JSON.stringify(body))}`].join(" \\\n");
  }

  function py(v, indent = "") {
    if (v === null || v === undefined) return "None";
    if (v === true) return "True";
    if (v === false) return "False";
    if (typeof v === "number") return String(v);
    if (typeof v === "string") return JSON.stringify(v);
    const inner = indent + "    ";
    if (Array.isArray(v)) {
      if (!v.length) return "[]";
      return `[\n${v.map((x) => inner + py(x, inner)).join(",\n")},\n${indent}]`;
    }
    const items = Object.entries(v);
    if (!items.length) return "{}";
    return `{\n${items.map(([k, x]) => `${inner}${JSON.stringify(k)}: ${py(x, inner)}`)
      .join(",\n")},\n${indent}}`;
  }

  function pythonOf(body) {
    const { alignment, stream, ...rest } = body;
    const args = Object.entries(rest).map(([k, v]) => `    ${k}=${py(v, "    ")},`);
    if (stream) args.push("    stream=True,");
    args.push(`    extra_body={"alignment": ${py(alignment, "    ")}},`);
    const use = stream
      ? ["for chunk in response:", "    if chunk.choices:",
        "        print(chunk.choices[0].delta.content or \"\", end=\"\")",
        "    if (chunk.model_extra or {}).get(\"alignment\"):",
        "        print(\"\\n\", chunk.model_extra[\"alignment\"])"]
      : ["print(response.choices[0].message.content)",
        "print(response.model_extra[\"alignment\"])"];
    return ["import os", "", "from openai import OpenAI", "",
      `client = OpenAI(base_url="${location.origin}/v1", api_key=os.environ["ALIGNSERVE_API_KEY"])`,
      "response = client.chat.completions.create(", ...args, ")", ...use].join("\n");
  }

  window.AlignSnippets = { curlOf, pythonOf };
}());
