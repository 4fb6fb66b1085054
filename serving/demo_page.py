"""The browser demo page the Serve app answers at ``GET /``: one self-contained HTML document.

The page reads ``GET /v1/model`` first and becomes what the served model does:

* an answerer (``kind: answerer``): choose an image file or one of the model's built-in test examples
  (``GET /v1/examples``), type a question, and the page posts the same JSON as any client to
  ``POST /v1/answer`` and shows the answer and the top-k scores;
* a captioner (``kind: captioner``): the question and top-k fields give way to the caption length and
  beam width (bounded by the model's ``max_length`` and ``max_num_beams``), the examples show one of
  their reference captions, and the page posts to ``POST /v1/caption`` and shows the caption and its
  token ids.

Either way it shows the server's and the round-trip latency and the model version. A refused request
(not an image, over the limits, a question too long, a beam too wide, a missing token) shows the API's
own 4xx message and status. No external scripts, styles or fonts: the page works on a cluster without
internet.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>amad: the distilled model</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  #model { color: #555; margin-top: 0; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; margin: 1rem 0; padding: .8rem 1rem; }
  label { display: block; margin: .5rem 0 .2rem; font-weight: 600; }
  input[type=text] { width: 100%; box-sizing: border-box; padding: .4rem; }
  #preview { image-rendering: pixelated; width: 192px; height: 192px; object-fit: contain; border: 1px solid #ddd; display: none; }
  button { padding: .5rem 1.2rem; font-size: 1rem; }
  #result, #caption-fields, #caption-result { display: none; }
  #error { display: none; color: #a40000; background: #fff0f0; padding: .6rem; border-radius: 6px; }
  table { border-collapse: collapse; } td, th { padding: .2rem .8rem; border-bottom: 1px solid #eee; text-align: left; }
  #answer, #caption { font-size: 1.6rem; font-weight: 700; }
  #tokens { font-family: monospace; color: #555; }
</style>
</head>
<body>
<h1 id="title">The distilled model</h1>
<p id="model">loading the model's description...</p>
<form id="form" novalidate>  <!-- the API checks every field; its 4xx message is shown -->
  <fieldset>
    <label for="example">A built-in test example</label>
    <select id="example"><option value="">(none: upload an image below)</option></select>
    <label for="file">or an image of your own (PNG or JPEG)</label>
    <input id="file" type="file" accept="image/png,image/jpeg">
    <p><img id="preview" alt="the image sent to the model"></p>
    <div id="question-fields">
      <label for="question">Question</label>
      <input id="question" type="text" autocomplete="off" placeholder="what shape is the red object ?">
      <label for="topk">Top-k answers</label>
      <input id="topk" type="number" min="1" max="10" value="3">
    </div>
    <div id="caption-fields">
      <label for="maxlength">Longest caption (tokens)</label>
      <input id="maxlength" type="number" min="1" value="16">
      <label for="beams">Beam width (1: greedy)</label>
      <input id="beams" type="number" min="1" value="1">
    </div>
    <label for="token">Bearer token (only if the server asks for one)</label>
    <input id="token" type="text" autocomplete="off">
  </fieldset>
  <button id="ask" type="submit">Ask</button>
</form>
<div id="error" role="alert"></div>
<div id="result" aria-live="polite">
  <div id="answer-result">
    <p>Answer: <span id="answer"></span> (score <span id="score"></span>)</p>
    <table><thead><tr><th>answer</th><th>score</th></tr></thead><tbody id="scores"></tbody></table>
  </div>
  <div id="caption-result">
    <p>Caption: <span id="caption"></span></p>
    <p>Token ids: <span id="tokens"></span></p>
  </div>
  <p>Latency: <span id="latency"></span> ms on the server, <span id="roundtrip"></span> ms round trip.
     Model: <span id="version"></span></p>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let examples = [], image = null;  // image: base64 of what will be sent
let captioner = false;             // what GET /v1/model said the service serves

function show(id, visible) { $(id).style.display = visible ? "block" : "none"; }
function fail(message) { $("error").textContent = message; show("error", true); show("result", false); }

function setImage(base64, type) {
  image = base64;
  $("preview").src = "data:" + (type || "image/png") + ";base64," + base64;
  show("preview", true);
}

function describe(m) {
  const name = m.name + " version " + m.version + (m.alias ? " (@" + m.alias + ")" : "");
  if (m.kind === "captioner") {
    captioner = true;
    $("title").textContent = "Caption an image with the distilled model";
    $("ask").textContent = "Caption";
    show("question-fields", false); show("caption-fields", true);
    $("maxlength").max = String(m.max_length); $("maxlength").value = String(m.max_length);
    $("beams").max = String(m.max_num_beams);
    return name + ": encoder " + m.encoder.layers + " layers x " + m.encoder.heads + " heads, decoder " +
      m.decoder.layers + " layers x " + m.decoder.heads + " heads, " + m.decoding + " decoding";
  }
  $("title").textContent = "Ask the distilled model";
  return name + ": " + m.heads + " heads x " + m.layers + " layers, " + m.labels.length + " answers";
}

// The examples list waits for the description: what an option says depends on the model's kind.
const described = fetch("v1/model").then((r) => r.json()).then((m) => { $("model").textContent = describe(m); })
  .catch(() => { $("model").textContent = "the model's description is not available"; });

described.then(() => fetch("v1/examples?count=8")).then((r) => r.ok ? r.json() : { examples: [] }).then((body) => {
  examples = body.examples || [];
  examples.forEach((e, i) => {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = e.question !== undefined ? e.question + "  (expected: " + e.expected + ")"
                                                  : "test image " + (i + 1) + "  (a reference: " + e.expected + ")";
    $("example").appendChild(option);
  });
  $("example").dataset.loaded = String(examples.length);
});

$("example").addEventListener("change", () => {
  const e = examples[Number($("example").value)];
  if ($("example").value === "" || !e) return;
  $("file").value = "";
  setImage(e.image, "image/png");
  if (e.question !== undefined) $("question").value = e.question;
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

function showAnswer(answer) {
  $("answer").textContent = answer.answer;
  $("score").textContent = answer.score.toFixed(3);
  $("scores").replaceChildren(...answer.top_k.map((t) => {
    const row = document.createElement("tr");
    for (const value of [t.answer, t.score.toFixed(3)]) { const cell = document.createElement("td"); cell.textContent = value; row.appendChild(cell); }
    return row;
  }));
}

function showCaption(answer) {
  $("caption").textContent = answer.caption;
  $("tokens").textContent = answer.tokens.join(" ");
}

// A number field sent as typed: an empty field is left out (the server's default), anything else goes
// to the server as a number or as the text it is, so the API's own message explains what is wrong.
function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : (/^-?[0-9]+$/.test(text) ? Number(text) : text);
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  show("error", false);
  await described;
  if (image === null) { fail("choose an example or an image first"); return; }
  const headers = { "Content-Type": "application/json" };
  if ($("token").value.trim()) headers["Authorization"] = "Bearer " + $("token").value.trim();
  const request = captioner ? { image: image, max_length: numberField("maxlength"), num_beams: numberField("beams") }
                            : { image: image, question: $("question").value, top_k: Number($("topk").value) || 1 };
  const started = performance.now();
  $("ask").disabled = true;
  try {
    const response = await fetch(captioner ? "v1/caption" : "v1/answer", { method: "POST", headers: headers, body: JSON.stringify(request) });
    const roundtrip = performance.now() - started;
    let answer;
    try { answer = await response.json(); } catch (err) { answer = { error: "the server answered " + response.status + " with no JSON" }; }
    if (!response.ok) { fail(response.status + ": " + (answer.error || response.statusText)); return; }
    show("answer-result", !captioner); show("caption-result", captioner);
    (captioner ? showCaption : showAnswer)(answer);
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
