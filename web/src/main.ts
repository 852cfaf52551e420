// The stylealign playground: calls stylealign.v1.StyleAlign and grpc.health.v1 over gRPC-Web
// (connect-web) on the page's own origin, with messages generated from the .proto by
// protoc-gen-es (src/gen/). Bundled by esbuild into assets/playground/app.js (web/build.sh).

import { create, toJsonString } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb";
import {
  Family,
  GenerateRequestSchema,
  LevelOptionsSchema,
  LoraWeightSchema,
  OfficialArgsSchema,
  PatchModelRequestSchema,
  Sampler,
  ShareAttn,
  ShareNorm,
  StepWindowSchema,
  StyleAlign,
  type LevelOptions,
  type LoraWeight,
  type GeneratedImage,
  type GenerateRequest,
  type ListModelsResponse,
  type ModelInfo,
  type OfficialArgs,
  type PatchModelRequest,
  type Session,
} from "./gen/stylealign/v1/stylealign_pb";

const SERVICE = "stylealign.v1.StyleAlign";

const transport = createGrpcWebTransport({ baseUrl: location.origin, useBinaryFormat: true });
const api = createClient(StyleAlign, transport);
const health = createClient(Health, transport);

// ---------- DOM helpers ----------

function $<T extends HTMLElement = HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing element #${id}`);
  return el as T;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, props: Partial<Record<string, string>> = {}, ...children: (Node | string)[]): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
}

const ui = {
  form: $<HTMLFormElement>("form"),
  health: $("health"),
  model: $<HTMLSelectElement>("model"),
  modelInfo: $("model-info"),
  shareNorm: $<HTMLSelectElement>("share-norm"),
  shareAttn: $<HTMLSelectElement>("share-attn"),
  scale: $<HTMLInputElement>("scale"),
  scaleValue: $<HTMLOutputElement>("scale-value"),
  useOfficial: $<HTMLInputElement>("use-official"),
  windowStart: $<HTMLInputElement>("window-start"),
  windowEnd: $<HTMLInputElement>("window-end"),
  levels: $<HTMLInputElement>("levels"),
  loras: $<HTMLInputElement>("loras"),
  loraList: $("lora-list"),
  loraNames: $<HTMLDataListElement>("lora-names"),
  official: $("official"),
  sessionInfo: $("session-info"),
  prompts: $<HTMLTextAreaElement>("prompts"),
  negative: $<HTMLInputElement>("negative"),
  seed: $<HTMLInputElement>("seed"),
  steps: $<HTMLInputElement>("steps"),
  guidance: $<HTMLInputElement>("guidance"),
  sampler: $<HTMLSelectElement>("sampler"),
  width: $<HTMLInputElement>("width"),
  height: $<HTMLInputElement>("height"),
  referenceFile: $<HTMLInputElement>("reference-file"),
  referencePreview: $<HTMLImageElement>("reference-preview"),
  referenceLabel: $("reference-label"),
  referenceClear: $<HTMLButtonElement>("reference-clear"),
  referenceCaption: $<HTMLInputElement>("reference-caption"),
  referenceOffset: $<HTMLInputElement>("reference-offset"),
  referenceGuidance: $<HTMLInputElement>("reference-guidance"),
  token: $<HTMLInputElement>("token"),
  clientId: $("client-id"),
  generate: $<HTMLButtonElement>("generate"),
  cancel: $<HTMLButtonElement>("cancel"),
  phase: $("phase"),
  queue: $("queue"),
  batch: $("batch"),
  progress: $<HTMLProgressElement>("progress"),
  progressText: $("progress-text"),
  error: $("error"),
  results: $("results"),
};

// ---------- identity ----------

/** Sessions belong to the calling client: a random id per browser, kept across reloads. */
function clientId(): string {
  const key = "stylealign.clientId";
  let id = localStorage.getItem(key);
  if (!id) {
    const bytes = crypto.getRandomValues(new Uint8Array(8));
    id = "playground-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    localStorage.setItem(key, id);
  }
  return id;
}

const CLIENT_ID = clientId();
ui.clientId.textContent = CLIENT_ID;
ui.token.value = sessionStorage.getItem("stylealign.token") ?? "";

function callHeaders(): Record<string, string> {
  const token = ui.token.value.trim();
  return token ? { authorization: `Bearer ${token}` } : { "x-client-id": CLIENT_ID };
}

// ---------- errors ----------

/** A problem with a form field, found before calling the server. */
class FieldProblem extends Error {
  constructor(readonly field: string, message: string, readonly input?: HTMLElement) {
    super(`${field}: ${message}`);
  }
}

function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function describe(err: unknown): string {
  if (err instanceof FieldProblem) return err.message;
  if (err instanceof ConnectError) return `${codeName(err.code)}: ${err.rawMessage}`;
  return err instanceof Error ? err.message : String(err);
}

function showError(err: unknown) {
  ui.error.textContent = describe(err);
  ui.error.hidden = false;
  if (err instanceof FieldProblem && err.input) err.input.focus();
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// ---------- server state ----------

let catalog: ListModelsResponse | undefined;

function selectedModel(): ModelInfo | undefined {
  return catalog?.models.find((m) => m.name === ui.model.value);
}

function familyName(f: Family): string {
  return Family[f] ?? "?";
}

function setHealth(state: "serving" | "waiting" | "down", text: string) {
  ui.health.dataset.state = state;
  ui.health.textContent = text;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls grpc.health.v1 for the service until it is SERVING, then loads the catalogue. */
async function connect() {
  for (;;) {
    try {
      const res = await health.check({ service: SERVICE }, { timeoutMs: 5000 });
      if (res.status === HealthCheckResponse_ServingStatus.SERVING) {
        setHealth("serving", "serving");
        break;
      }
      setHealth("waiting", "warming up…");
    } catch (err) {
      setHealth("down", err instanceof ConnectError && err.code === Code.Unavailable ? "unreachable" : "unavailable");
    }
    await sleep(1500);
  }
  try {
    await loadCatalog();
  } catch (err) {
    showError(err);
  }
  // Keep the badge honest (drain, restart).
  for (;;) {
    await sleep(15000);
    try {
      const res = await health.check({ service: SERVICE }, { timeoutMs: 5000 });
      const serving = res.status === HealthCheckResponse_ServingStatus.SERVING;
      setHealth(serving ? "serving" : "waiting", serving ? "serving" : "not serving");
    } catch {
      setHealth("down", "unreachable");
    }
  }
}

async function loadCatalog() {
  catalog = await api.listModels({}, { headers: callHeaders() });
  ui.model.replaceChildren(
    ...catalog.models.map((m) => el("option", { value: m.name, text: `${m.name} · ${familyName(m.family)}` })),
  );
  ui.sampler.replaceChildren(...catalog.samplers.map((s) => el("option", { value: s, text: s })));
  ui.steps.value = String(catalog.defaultSteps);
  ui.steps.max = String(catalog.maxSteps);
  ui.guidance.value = String(Math.round(catalog.defaultGuidanceScale * 100) / 100);
  ui.prompts.dataset.max = String(catalog.maxPrompts);
  applyModel();
  ui.generate.disabled = catalog.models.length === 0;
  await loadLoras();
}

/** The server's LoRA folder, offered as completions of the LoRAs field. */
async function loadLoras() {
  const res = await api.listLoras({}, { headers: callHeaders() });
  const usable = res.loras.filter((l) => l.models.length > 0);
  ui.loraNames.replaceChildren(...usable.map((l) => el("option", { value: `${l.name}:1`, text: `${familyName(l.family)} · ${l.format} · rank ${l.rank}` })));
  ui.loraList.textContent = usable.length === 0 ? "(none served)" : `(served: ${usable.map((l) => `${l.name} for ${l.models.join(", ")}`).join("; ")})`;
}

function applyModel() {
  const m = selectedModel();
  if (!m || !catalog) return;
  for (const [input, native] of [[ui.width, m.nativeWidth], [ui.height, m.nativeHeight]] as const) {
    input.step = String(m.sizeMultiple);
    input.min = String(m.sizeMultiple);
    input.max = String(catalog.maxSize);
    input.value = String(native);
  }
  const facts = [`${familyName(m.family)}`, `native ${m.nativeWidth}×${m.nativeHeight}`, `sizes in multiples of ${m.sizeMultiple}`];
  if (m.format) facts.push(m.format === "single_file" ? "single file" : m.format);
  if (m.dtype) facts.push(m.dtype);
  if (m.predictionType) facts.push(`${m.predictionType} (${m.predictionTypeSource.replace("_", " ")})`);
  if (m.hash) facts.push(`hash ${m.hash}`);
  facts.push(m.source);
  ui.modelInfo.textContent = facts.join(" · ");
}

ui.model.addEventListener("change", applyModel);

// Another identity: its own sessions; the catalogue may have been refused to the previous one.
ui.token.addEventListener("change", () => {
  sessionStorage.setItem("stylealign.token", ui.token.value.trim());
  session = undefined;
  ui.sessionInfo.textContent = "Identity changed: a new session is created on the next Generate.";
  if (ui.health.dataset.state === "serving") {
    clearError();
    loadCatalog().catch(showError);
  }
});

// ---------- session ----------

let session: { id: string; key: string } | undefined;

ui.scale.addEventListener("input", () => (ui.scaleValue.value = Number(ui.scale.value).toFixed(2)));
ui.useOfficial.addEventListener("change", () => {
  ui.official.dataset.disabled = String(!ui.useOfficial.checked);
  for (const id of ["share-norm", "share-attn", "scale"]) ($(id) as HTMLInputElement).disabled = ui.useOfficial.checked;
});

function officialArgs(): OfficialArgs {
  const args = create(OfficialArgsSchema);
  for (const input of ui.official.querySelectorAll<HTMLInputElement>("[data-official]")) {
    const key = input.dataset.official as keyof OfficialArgs;
    if (input.type === "checkbox") {
      (args as Record<string, unknown>)[key] = input.checked;
    } else {
      const v = Number(input.value);
      if (input.value.trim() === "" || !Number.isFinite(v)) throw new FieldProblem(`advanced.${snake(key)}`, "must be a number", input);
      (args as Record<string, unknown>)[key] = v;
    }
  }
  return args;
}

function snake(s: string): string {
  return s.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase());
}

/** The levels field: `NAME[:OPT,...]` entries separated by `;` (the CLI's `--style-level` syntax). */
function levelOptions(): LevelOptions[] {
  const text = ui.levels.value.trim();
  if (text === "") return [];
  return text.split(";").filter((e) => e.trim() !== "").map((entry, i) => {
    const [name, opts = ""] = entry.trim().split(/:(.*)/s, 2);
    const field = `levels[${i}]`;
    if (!name) throw new FieldProblem(field, `expected LEVEL[:OPTS], got ${JSON.stringify(entry.trim())}`, ui.levels);
    const level = create(LevelOptionsSchema, { name: name.trim() });
    const onOff = (v: string, what: string) => {
      if (v !== "on" && v !== "off") throw new FieldProblem(`${field}.${what}`, `${JSON.stringify(v)} is not on or off`, ui.levels);
      return v === "on";
    };
    for (const opt of opts.split(",").map((o) => o.trim()).filter((o) => o !== "")) {
      const [key, value] = opt.split("=", 2);
      if (value === undefined && (key === "on" || key === "off")) level.enabled = key === "on";
      else if (key === "gain") {
        const g = Number(value);
        if (value.trim() === "" || !Number.isFinite(g)) throw new FieldProblem(`${field}.gain`, "must be a number", ui.levels);
        level.gain = g;
      } else if (key === "norm" && value !== undefined) level.shareGroupNorm = onOff(value, "share_group_norm");
      else if (key === "attn" && value !== undefined) level.shareAttention = onOff(value, "share_attention");
      else throw new FieldProblem(field, `unknown option ${JSON.stringify(opt)} (off, on, gain=X, norm=on|off, attn=on|off)`, ui.levels);
    }
    return level;
  });
}

/** The LoRAs field: `NAME[:WEIGHT]` entries separated by `,` (the CLI's `--lora` syntax; weight 1 when left out). */
function loraWeights(): LoraWeight[] {
  return ui.loras.value
    .split(",")
    .map((e) => e.trim())
    .filter((e) => e !== "")
    .map((entry, i) => {
      const [name, weight] = entry.split(/:(.*)/s, 2);
      const w = weight === undefined ? 1 : Number(weight);
      if (!name.trim()) throw new FieldProblem(`loras[${i}].name`, `expected NAME[:WEIGHT], got ${JSON.stringify(entry)}`, ui.loras);
      if (weight !== undefined && (weight.trim() === "" || !Number.isFinite(w))) throw new FieldProblem(`loras[${i}].weight`, "must be a number", ui.loras);
      return create(LoraWeightSchema, { name: name.trim(), weight: w });
    });
}

/** The step window, when it is not the default [0, 1]. */
function stepWindow() {
  const number = (input: HTMLInputElement, field: string) => {
    const v = Number(input.value);
    if (input.value.trim() === "" || !Number.isFinite(v)) throw new FieldProblem(field, "must be a number", input);
    return v;
  };
  const start = number(ui.windowStart, "window.start");
  const end = number(ui.windowEnd, "window.end");
  return start === 0 && end === 1 ? undefined : create(StepWindowSchema, { start, end });
}

function patchRequest(): PatchModelRequest {
  if (!ui.model.value) throw new FieldProblem("model", "no model loaded", ui.model);
  const scope = { window: stepWindow(), levels: levelOptions(), loras: loraWeights() };
  if (ui.useOfficial.checked) return create(PatchModelRequestSchema, { model: ui.model.value, advanced: officialArgs(), ...scope });
  return create(PatchModelRequestSchema, {
    model: ui.model.value,
    shareNorm: ShareNorm[ui.shareNorm.value as keyof typeof ShareNorm],
    shareAttn: ShareAttn[ui.shareAttn.value as keyof typeof ShareAttn],
    scale: Number(ui.scale.value),
    ...scope,
  });
}

function describeSession(s: Session): string {
  const sw = s.options?.switches;
  const parts = [`session ${s.sessionId.slice(0, 10)}… on ${s.model}`];
  if (s.options?.flavour.case === "official") parts.push("official args");
  if (sw) {
    const adain = [sw.adainQ && "q", sw.adainK && "k", sw.adainV && "v"].filter(Boolean).join("+") || "none";
    parts.push(`group norm ${sw.shareGroupNorm ? "shared" : "own"}`, `attention ${sw.shareAttention ? (sw.fullAttentionShare ? "fully shared" : "shared") : "own"}`, `AdaIN ${adain} (${sw.adainSite})`, `gain ${sw.gain.toFixed(2)}`);
  }
  const w = s.options?.window;
  if (w && (w.start !== 0 || w.end !== 1)) parts.push(`steps ${w.start}–${w.end}`);
  const levels = s.options?.levels ?? [];
  const changed = levels.filter((l) => !l.enabled || !l.shareAttention || l.gain !== 1 || l.shareGroupNorm !== sw?.shareGroupNorm);
  if (changed.length > 0) {
    parts.push(
      "levels " +
        changed
          .map((l) => (l.enabled ? `${l.name} (norm ${l.shareGroupNorm ? "shared" : "own"}, attention ${l.shareAttention ? "shared" : "own"}, gain ${(l.gain ?? 1).toFixed(2)})` : `${l.name} off`))
          .join(", "),
    );
  }
  if (s.loras.length > 0) parts.push("LoRAs " + s.loras.map((l) => `${l.name} ${l.weight.toFixed(2)}`).join(", "));
  return parts.join(" · ");
}

/** The session for the current options: reused while they stay the same. */
async function ensureSession(): Promise<string> {
  const req = patchRequest();
  const key = toJsonString(PatchModelRequestSchema, req);
  if (session && session.key === key) return session.id;
  const old = session;
  session = undefined;
  const s = await api.patchModel(req, { headers: callHeaders() });
  session = { id: s.sessionId, key };
  ui.sessionInfo.textContent = describeSession(s);
  if (old) api.releaseSession({ sessionId: old.id }, { headers: callHeaders() }).catch(() => {});
  return s.sessionId;
}

// ---------- reference image ----------

let referenceUrl: string | undefined;

ui.referenceFile.addEventListener("change", () => {
  const file = ui.referenceFile.files?.[0];
  if (referenceUrl) URL.revokeObjectURL(referenceUrl);
  referenceUrl = file ? URL.createObjectURL(file) : undefined;
  ui.referencePreview.hidden = !file;
  ui.referenceClear.hidden = !file;
  if (referenceUrl) ui.referencePreview.src = referenceUrl;
  ui.referenceLabel.textContent = file ? `${file.name} · ${(file.size / 1024).toFixed(0)} KiB` : "Choose a PNG or JPEG to use as the style reference";
});

ui.referenceClear.addEventListener("click", () => {
  ui.referenceFile.value = "";
  ui.referenceFile.dispatchEvent(new Event("change"));
});

// ---------- the request ----------

function whole(input: HTMLInputElement, field: string, min: number): number {
  const raw = input.value.trim();
  if (raw === "") return 0;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < min) throw new FieldProblem(field, `must be a whole number ≥ ${min}`, input);
  return v;
}

function decimal(input: HTMLInputElement, field: string): number | undefined {
  const raw = input.value.trim();
  if (raw === "") return undefined;
  const v = Number(raw);
  if (!Number.isFinite(v)) throw new FieldProblem(field, "must be a number", input);
  return v;
}

async function generateRequest(sessionId: string, prompts: string[]): Promise<GenerateRequest> {
  const seedText = ui.seed.value.trim();
  let seed: bigint | undefined;
  if (seedText !== "") {
    if (!/^\d+$/.test(seedText) || BigInt(seedText) >= 1n << 64n) throw new FieldProblem("seed", "must be a whole number from 0 to 2^64−1 (empty: random)", ui.seed);
    seed = BigInt(seedText);
  }
  const file = ui.referenceFile.files?.[0];
  const req = create(GenerateRequestSchema, {
    sessionId,
    prompts,
    negativePrompt: ui.negative.value,
    seed,
    steps: whole(ui.steps, "steps", 1),
    guidanceScale: decimal(ui.guidance, "guidance_scale"),
    width: whole(ui.width, "width", 1),
    height: whole(ui.height, "height", 1),
    sampler: Sampler[ui.sampler.value.toUpperCase() as keyof typeof Sampler] ?? Sampler.UNSPECIFIED,
  });
  if (file) {
    req.referenceImage = new Uint8Array(await file.arrayBuffer());
    req.referenceCaption = ui.referenceCaption.value.trim();
    req.referenceOffset = whole(ui.referenceOffset, "reference_offset", 0);
    req.referenceGuidanceScale = decimal(ui.referenceGuidance, "reference_guidance_scale");
  }
  return req;
}

function readPrompts(): string[] {
  const prompts = ui.prompts.value.split("\n").map((p) => p.trim()).filter((p) => p !== "");
  if (prompts.length === 0) throw new FieldProblem("prompts", "at least one prompt (one per line)", ui.prompts);
  const max = Number(ui.prompts.dataset.max ?? "0");
  if (max > 0 && prompts.length > max) throw new FieldProblem("prompts", `at most ${max} per set on this server (got ${prompts.length})`, ui.prompts);
  return prompts;
}

// ---------- results ----------

let blobUrls: string[] = [];

function resetResults() {
  for (const u of blobUrls) URL.revokeObjectURL(u);
  blobUrls = [];
  ui.results.replaceChildren();
}

function card(label: string, prompt: string, reference: boolean): HTMLElement {
  const c = el("figure", { class: "card pending" });
  if (reference) c.dataset.reference = "true";
  const frame = el("div", { class: "frame" }, el("div", { class: "spinner" }));
  const badge = el("span", { class: reference ? "badge reference" : "badge", text: label });
  const caption = el("figcaption", {}, el("p", { class: "prompt", text: prompt }));
  c.append(badge, frame, caption);
  ui.results.append(c);
  return c;
}

function fillCard(c: HTMLElement, image: GeneratedImage) {
  const url = URL.createObjectURL(new Blob([image.png as Uint8Array<ArrayBuffer>], { type: "image/png" }));
  blobUrls.push(url);
  const img = el("img", { class: "generated", alt: image.prompt, src: url, width: String(image.width), height: String(image.height) });
  img.dataset.index = String(image.index);
  // Small images are magnified: keep their pixels sharp.
  if (Math.max(image.width, image.height) < 256) img.classList.add("small");
  c.querySelector(".frame")!.replaceChildren(img);
  c.classList.remove("pending");
  const name = `stylealign-${image.seed}-${image.index}.png`;
  const meta = el(
    "div",
    { class: "meta" },
    el("span", { class: "muted", text: `${image.width}×${image.height} · seed ${image.seed}`, title: `seed ${image.seed}` }),
    el("a", { class: "download", href: url, download: name, title: "The PNG carries every parameter in its `parameters` chunk" }, "Download PNG"),
  );
  const params = el("details", { class: "params" }, el("summary", { text: "parameters" }), el("pre", { text: prettyJson(image.parameters) }));
  c.querySelector("figcaption")!.append(meta, params);
}

function prettyJson(text: string): string {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

// ---------- generate ----------

let running: AbortController | undefined;

function setPhase(phase: "idle" | "queued" | "running" | "done" | "failed" | "cancelled", text: string) {
  ui.phase.dataset.phase = phase;
  ui.phase.textContent = text;
}

function setRunning(on: boolean) {
  ui.generate.disabled = on;
  ui.cancel.hidden = !on;
  ui.form.classList.toggle("busy", on);
}

async function generate() {
  clearError();
  let prompts: string[];
  try {
    prompts = readPrompts();
    patchRequest();
  } catch (err) {
    showError(err);
    return;
  }
  const abort = new AbortController();
  running = abort;
  setRunning(true);
  setPhase("queued", "Submitting…");
  ui.queue.hidden = true;
  ui.batch.textContent = "";
  ui.progress.value = 0;
  ui.progress.max = 1;
  ui.progress.dataset.events = "0";
  ui.progressText.textContent = "—";
  resetResults();

  const file = ui.referenceFile.files?.[0];
  const cards: HTMLElement[] = [];
  if (file && referenceUrl) {
    const ref = card("reference · uploaded", ui.referenceCaption.value.trim() || file.name, true);
    const img = el("img", { class: "uploaded", alt: "uploaded reference", src: referenceUrl });
    ref.querySelector(".frame")!.replaceChildren(img);
    ref.classList.remove("pending");
    prompts.forEach((p, i) => cards.push(card(`#${i + 1}`, p, false)));
  } else {
    prompts.forEach((p, i) => cards.push(card(i === 0 ? "reference" : `#${i}`, p, i === 0)));
  }

  const t0 = performance.now();
  let attempt = 0;
  for (;;) {
    let events = 0;
    try {
      const sessionId = await ensureSession();
      const req = await generateRequest(sessionId, prompts);
      for await (const res of api.generate(req, { headers: callHeaders(), signal: abort.signal })) {
        events++;
        const ev = res.event;
        switch (ev.case) {
          case "queued":
            setPhase("queued", "Queued");
            ui.queue.hidden = false;
            ui.queue.textContent = ev.value.position === 0 ? `next to run · ${ev.value.queueDepth} in queue` : `${ev.value.position} ahead · ${ev.value.queueDepth} in queue`;
            ui.queue.dataset.position = String(ev.value.position);
            break;
          case "started":
            setPhase("running", "Running");
            ui.queue.hidden = true;
            ui.batch.textContent = `batch of ${ev.value.batchRows} image${ev.value.batchRows === 1 ? "" : "s"} from ${ev.value.batchSets} set${ev.value.batchSets === 1 ? "" : "s"} · waited ${ev.value.queueSeconds.toFixed(2)} s`;
            break;
          case "progress":
            ui.progress.max = ev.value.totalSteps;
            ui.progress.value = ev.value.step;
            ui.progress.dataset.events = String(Number(ui.progress.dataset.events) + 1);
            ui.progressText.textContent = `step ${ev.value.step} / ${ev.value.totalSteps}`;
            break;
          case "image": {
            const c = cards[ev.value.index];
            if (c) fillCard(c, ev.value);
            setPhase("running", `Decoding · ${ui.results.querySelectorAll("img.generated").length} / ${cards.length}`);
            break;
          }
        }
      }
      setPhase("done", `Done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
      break;
    } catch (err) {
      // An expired or released session: make a new one and retry once.
      if (err instanceof ConnectError && err.code === Code.NotFound && events === 0 && attempt === 0) {
        attempt++;
        session = undefined;
        continue;
      }
      if (abort.signal.aborted) {
        setPhase("cancelled", "Cancelled");
      } else {
        setPhase("failed", "Failed");
        showError(err);
      }
      // Keep what arrived; drop the placeholders of what never will.
      for (const c of ui.results.querySelectorAll(".card.pending")) c.remove();
      if (!ui.results.querySelector("img.generated")) {
        ui.results.replaceChildren(el("p", { class: "empty", text: abort.signal.aborted ? "Cancelled before any image arrived." : "No images: see the error above." }));
      }
      break;
    }
  }
  running = undefined;
  setRunning(false);
}

ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (!running) void generate();
});
ui.cancel.addEventListener("click", () => running?.abort());

void connect();
