"""The browser demo page the Serve app answers at ``GET /``: one self-contained HTML document.

Choose an image file or one of the model's built-in test examples (``GET /v1/examples``), type a
question, and the page posts the same JSON as any client to ``POST /v1/answer`` and shows the answer,
the top-k scores, the server's and the round-trip latency and the model version. A refused request
(not an image, over the limits, a question too long, a missing token) shows the API's own 4xx message
and status. No external scripts, styles or fonts: the page works on a cluster without internet.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>amad: ask the distilled model</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  #model { color: #555; margin-top: 0; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; margin: 1rem 0; padding: .8rem 1rem; }
  label { display: block; margin: .5rem 0 .2rem; font-weight: 600; }
  input[type=text] { width: 100%; box-sizing: border-box; padding: .4rem; }
  #preview { image-rendering: pixelated; width: 192px; height: 192px; object-fit: contain; border: 1px solid #ddd; display: none; }
  button { padding: .5rem 1.2rem; font-size: 1rem; }
  #result { display: none; } #error { display: none; color: #a40000; background: #fff0f0; padding: .6rem; border-radius: 6px; }
  table { border-collapse: collapse; } td, th { padding: .2rem .8rem; border-bottom: 1px solid #eee; text-align: left; }
  #answer { font-size: 1.6rem; font-weight: 700; }
</style>
</head>
<body>
<h1>Ask the distilled model</h1>
<p id="model">loading the model's description...</p>
<form id="form">
  <fieldset>
    <label for="example">A built-in test example</label>
    <select id="example"><option value="">(none: upload an image below)</option></select>
    <label for="file">or an image of your own (PNG or JPEG)</label>
    <input id="file" type="file" accept="image/png,image/jpeg">
    <p><img id="preview" alt="the image being asked about"></p>
    <label for="question">Question</label>
    <input id="question" type="text" autocomplete="off" placeholder="what shape is the red object ?">
    <label for="topk">Top-k answers</label>
    <input id="topk" type="number" min="1" max="10" value="3">
    <label for="token">Bearer token (only if the server asks for one)</label>
    <input id="token" type="text" autocomplete="off">
  </fieldset>
  <button id="ask" type="submit">Ask</button>
</form>
<div id="error" role="alert"></div>
<div id="result" aria-live="polite">
  <p>Answer: <span id="answer"></span> (score <span id="score"></span>)</p>
  <table><thead><tr><th>answer</th><th>score</th></tr></thead><tbody id="scores"></tbody></table>
  <p>Latency: <span id="latency"></span> ms on the server, <span id="roundtrip"></span> ms round trip.
     Model: <span id="version"></span></p>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let examples = [], image = null;  // image: base64 of what will be sent

function show(id, visible) { $(id).style.display = visible ? "block" : "none"; }
function fail(message) { $("error").textContent = message; show("error", true); show("result", false); }

function setImage(base64, type) {
  image = base64;
  $("preview").src = "data:" + (type || "image/png") + ";base64," + base64;
  show("preview", true);
}

fetch("v1/model").then((r) => r.json()).then((m) => {
  $("model").textContent = m.name + " version " + m.version + (m.alias ? " (@" + m.alias + ")" : "") +
    ": " + m.heads + " heads x " + m.layers + " layers, " + m.labels.length + " answers";
}).catch(() => { $("model").textContent = "the model's description is not available"; });

fetch("v1/examples?count=8").then((r) => r.ok ? r.json() : { examples: [] }).then((body) => {
  examples = body.examples || [];
  examples.forEach((e, i) => {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = e.question + "  (expected: " + e.expected + ")";
    $("example").appendChild(option);
  });
  $("example").dataset.loaded = String(examples.length);
});

$("example").addEventListener("change", () => {
  const e = examples[Number($("example").value)];
  if ($("example").value === "" || !e) return;
  $("file").value = "";
  setImage(e.image, "image/png");
  $("question").value = e.question;
});

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  $("example").value = "";
  const reader = new FileReader();
  reader.onload = () => setImage(String(reader.result).split(",", 2)[1] || "", file.type);
  reader.onerror = () => fail("could not read " + file.name);
  reader.readAsDataURL(file);
});

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  show("error", false);
  if (image === null) { fail("choose an example or an image first"); return; }
  const headers = { "Content-Type": "application/json" };
  if ($("token").value.trim()) headers["Authorization"] = "Bearer " + $("token").value.trim();
  const body = JSON.stringify({ image: image, question: $("question").value, top_k: Number($("topk").value) || 1 });
  const started = performance.now();
  $("ask").disabled = true;
  try {
    const response = await fetch("v1/answer", { method: "POST", headers: headers, body: body });
    const roundtrip = performance.now() - started;
    let answer;
    try { answer = await response.json(); } catch (err) { answer = { error: "the server answered " + response.status + " with no JSON" }; }
    if (!response.ok) { fail(response.status + ": " + (answer.error || response.statusText)); return; }
    $("answer").textContent = answer.answer;
    $("score").textContent = answer.score.toFixed(3);
    $("scores").replaceChildren(...answer.top_k.map((t) => {
      const row = document.createElement("tr");
      for (const value of [t.answer, t.score.toFixed(3)]) { const cell = document.createElement("td"); cell.textContent = value; row.appendChild(cell); }
      return row;
    }));
    $("latency").textContent = answer.latency_ms.toFixed(1);
    $("roundtrip").textContent = roundtrip.toFixed(1);
    $("version").textContent = answer.model.name + " v" + answer.model.version;
    show("result", true);
  } catch (err) {
    fail("the request failed: " + err);
  } finally {
    $("ask").disabled = false;
  }
});
</script>
</body>
</html>
"""
