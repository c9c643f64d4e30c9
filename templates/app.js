// The chat page: the conversation on screen, streaming replies, the list of past chats, settings
// and what the server says about its model. Talking to the server is api.js's job, keeping chats
// store.js's, turning a model's text into safe markup render.js's.

import { getJson, setKeyAsker, streamChat } from "./api.js";
import { splitReasoning } from "./reasoning.js";
import { renderMarkdown } from "./render.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const el = {
  app: $("app"), sidebar: $("sidebar"), backdrop: $("backdrop"), list: $("chat-list"), search: $("search"),
  messages: $("messages"), thread: $("thread"), empty: $("empty"), model: $("model"), facts: $("model-facts"),
  form: $("composer"), input: $("input"), send: $("send"), attachments: $("attachments"), attachFile: $("attach-file"),
  context: $("context"), contextFill: $("context-fill"), contextText: $("context-text"), toast: $("toast"),
  settings: $("settings"), ask: $("ask"),
};

const state = {
  info: null, // GET /llamabox/info
  chats: [], // every stored chat, newest first
  chat: null, // the chat on screen (stored once it has a message)
  generating: null, // {controller, chat, message} while a reply streams
  attachments: [], // [{name, text}] to go with the next message
  error: null, // {error, retry} shown under the conversation
  editing: -1, // index of the user message being edited
};

const MAX_FILE_BYTES = 1_000_000;
const WARN_FILL = 0.85;

// --- small helpers ------------------------------------------------------------------------------------

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "icon");
  svg.setAttribute("aria-hidden", "true");
  const use = document.createElementNS("http://www.w3.org/2000/svg", "use");
  use.setAttribute("href", "#i-" + name);
  svg.append(use);
  return svg;
}

function iconButton(name, label, action, extra = {}) {
  return h("button", { type: "button", class: "btn-icon", "aria-label": label, title: label, "data-action": action, ...extra }, icon(name));
}

const number = new Intl.NumberFormat();

function bytes(n) {
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

let toastTimer = 0;
function toast(text) {
  el.toast.textContent = text;
  el.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.toast.hidden = true), 2200);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Pages served over plain http from another machine have no clipboard API.
    const area = h("textarea", { style: "position:fixed;opacity:0" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  toast("Copied");
}

function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// --- dialogs ------------------------------------------------------------------------------------------

// A question in the page's own dialog: resolves to the text entered (or "" for a plain OK), or null.
function ask({ title, text, value = "", input = "text", ok = "OK", placeholder = "" }) {
  const dialog = el.ask;
  $("ask-title").textContent = title;
  $("ask-text").textContent = text;
  const field = $("ask-input");
  field.hidden = input === null;
  field.type = input || "text";
  field.value = value;
  field.placeholder = placeholder;
  $("ask-ok").textContent = ok;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? (input === null ? "" : field.value) : null), { once: true });
    dialog.showModal();
    (input === null ? $("ask-ok") : field).focus();
    if (input !== null) field.select();
  });
}
$("ask-cancel").addEventListener("click", () => el.ask.close(""));

setKeyAsker((refused) =>
  ask({
    title: refused ? "That API key was refused" : "This server wants its API key",
    text: refused
      ? "The server did not accept that key. Enter the key it was started with (--api-key or LLAMABOX_API_KEY)."
      : "It was started with --api-key. Enter the key to chat; this tab keeps it until you close it.",
    input: "password",
    ok: "Use key",
    placeholder: "API key",
  }),
);

// --- settings -----------------------------------------------------------------------------------------

// What the user changed; null (or absent) means the bundle's default, which the server applies.
let settings = {};
const settingsKey = () => "llamabox-settings:" + (state.info?.model?.id || "");

function loadSettings() {
  try {
    settings = JSON.parse(localStorage.getItem(settingsKey())) || {};
  } catch {
    settings = {};
  }
}

function saveSettings() {
  localStorage.setItem(settingsKey(), JSON.stringify(settings));
}

function defaults() {
  return { system: state.info?.system_prompt || "", ...state.info?.defaults };
}

function fillSettingsForm() {
  const d = defaults();
  $("set-system").value = settings.system ?? d.system;
  $("set-temperature").value = settings.temperature ?? d.temperature ?? "";
  $("set-top-p").value = settings.top_p ?? d.top_p ?? "";
  $("set-max-tokens").value = settings.max_tokens ?? d.max_tokens ?? "";
  const baked = d.system ? "The system prompt starts as the bundle's own; left empty, the server still adds the bundle's." : "";
  $("defaults-note").textContent =
    `The bundle's defaults: temperature ${d.temperature ?? "?"}, top-p ${d.top_p ?? "?"}, max tokens ${d.max_tokens ?? "no limit"}. ${baked}`;
}

function readNumber(input, min, max, integer) {
  const raw = input.value.trim();
  if (raw === "") return null;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < min || value > max || (integer && !Number.isInteger(value))) return undefined;
  return value;
}

function settingsChanged() {
  const d = defaults();
  const system = $("set-system").value;
  settings.system = system === d.system ? null : system;
  const fields = [["temperature", "set-temperature", 0, 2, false], ["top_p", "set-top-p", 0, 1, false], ["max_tokens", "set-max-tokens", 1, 1e9, true]];
  for (const [name, id, min, max, integer] of fields) {
    const value = readNumber($(id), min, max, integer);
    $(id).setCustomValidity(value === undefined ? `between ${min} and ${max}` : "");
    if (value !== undefined) settings[name] = value === (d[name] ?? null) ? null : value;
  }
  saveSettings();
}

el.settings.addEventListener("input", settingsChanged);
$("reset-settings").addEventListener("click", () => {
  settings = {};
  saveSettings();
  fillSettingsForm();
  toast("Settings reset to the bundle's defaults");
});
$("open-settings").addEventListener("click", () => {
  fillSettingsForm();
  el.settings.showModal();
});

// --- the model's facts ---------------------------------------------------------------------------------

function hardwareText(hw) {
  if (!hw) return "";
  if (hw.gpu && hw.gpu_layers > 0) {
    const where = [hw.gpu.name, hw.layers_total && `${hw.gpu_layers}/${hw.layers_total} layers`].filter(Boolean).join(", ");
    return `GPU: ${hw.gpu.description || hw.gpu.backend} (${where})`;
  }
  return `CPU kernels: ${hw.cpu_variant}`;
}

function showInfo() {
  const info = state.info;
  const m = info.model;
  el.model.textContent = m.id;
  el.model.title = m.id;
  const facts = [m.parameters && `${m.parameters} parameters`, bytes(m.size), m.license && `licence ${m.license}`, hardwareText(info.hardware)];
  el.facts.textContent = facts.filter(Boolean).join(" · ");
  const hw = info.hardware || {};
  const rows = [
    ["Model", m.id], ["File", m.file_name], ["Size", bytes(m.size)], ["Parameters", m.parameters], ["Architecture", m.architecture],
    ["Licence", m.license || "not stated in the file"], ["Context", `${number.format(info.n_ctx)} tokens per chat${info.shared_cache && info.slots > 1 ? `, shared by up to ${info.slots} chats at once` : ""}`],
    ["Chats at once", info.slots], ["CPU", hw.cpu?.name], ["CPU kernels", hw.cpu_variant_proof || hw.cpu_variant],
    ["GPU", hw.offload || (hw.gpu ? hw.gpu.name : "none")], ["llamabox", info.version],
  ];
  $("about").replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== "").flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })]));
}

// What the server says about its model; `retry` is what the error's Retry button does if it cannot be had.
async function loadInfo(retry = loadInfo) {
  try {
    state.info = await getJson("/llamabox/info");
  } catch (error) {
    el.facts.textContent = "not connected";
    showError(error, retry);
    return false;
  }
  loadSettings();
  showInfo();
  if (state.error?.retry === loadInfo) clearError();
  updateContext();
  return true;
}

// --- the list of chats ---------------------------------------------------------------------------------

async function refreshList() {
  state.chats = await store.listChats();
  renderList();
}

function renderList() {
  const query = el.search.value.trim().toLocaleLowerCase();
  const shown = state.chats.filter((c) => !query || c.title.toLocaleLowerCase().includes(query));
  const items = shown.map((chat) => {
    const current = state.chat?.id === chat.id;
    return h("div", { class: "chat-item" + (current ? " current" : ""), "data-id": chat.id },
      h("button", { type: "button", class: "chat-open", title: chat.title, dir: "auto", "aria-current": current ? "page" : null, "data-action": "open", text: chat.title }),
      iconButton("edit", `Rename “${chat.title}”`, "rename"),
      iconButton("trash", `Delete “${chat.title}”`, "delete"));
  });
  if (!items.length) items.push(h("p", { class: "none", text: query ? "No chat has that in its title." : "No chats yet." }));
  el.list.replaceChildren(...items);
}

el.search.addEventListener("input", renderList);

el.list.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-action]");
  const id = button?.closest(".chat-item")?.dataset.id;
  if (!id) return;
  const chat = state.chats.find((c) => c.id === id);
  if (button.dataset.action === "open") {
    await openChat(id);
    closeSidebar();
  } else if (button.dataset.action === "rename") {
    const title = await ask({ title: "Rename chat", text: "A new title for this chat:", value: chat.title, ok: "Rename" });
    if (title === null || !title.trim()) return;
    const stored = state.chat?.id === id ? state.chat : await store.getChat(id);
    stored.title = title.trim();
    await store.saveChat(stored);
    await refreshList();
    if (state.chat?.id === id) showTitle();
  } else if (button.dataset.action === "delete") {
    const sure = await ask({ title: "Delete chat?", text: `“${chat.title}” will be deleted from this browser.`, input: null, ok: "Delete" });
    if (sure === null) return;
    if (state.chat?.id === id) {
      state.chat.deleted = true; // a reply still streaming into it must not store it again
      newChat();
    }
    await store.deleteChat(id);
    await refreshList();
    toast("Chat deleted");
  }
});

function openSidebar() {
  el.app.classList.add("sidebar-open");
  el.backdrop.hidden = false;
  $("open-sidebar").setAttribute("aria-expanded", "true");
  el.search.focus();
}

function closeSidebar() {
  if (!el.app.classList.contains("sidebar-open")) return;
  el.app.classList.remove("sidebar-open");
  el.backdrop.hidden = true;
  $("open-sidebar").setAttribute("aria-expanded", "false");
}

$("open-sidebar").addEventListener("click", openSidebar);
$("close-sidebar").addEventListener("click", closeSidebar);
el.backdrop.addEventListener("click", closeSidebar);

// --- opening chats --------------------------------------------------------------------------------------

function blankChat() {
  return { id: store.newId(), title: "", created: Date.now(), updated: Date.now(), model: state.info?.model?.id || "", messages: [] };
}

function setHash(id) {
  history.replaceState(null, "", id ? "#chat=" + id : location.pathname);
}

function showTitle() {
  document.title = state.chat?.title ? `${state.chat.title} · llamabox` : "llamabox";
}

function newChat() {
  stopGenerating();
  state.chat = blankChat();
  state.editing = -1;
  clearError(true);
  setHash(null);
  renderThread();
  renderList();
  updateContext();
  showTitle();
  el.input.focus();
}

async function openChat(id) {
  if (state.chat?.id === id) return;
  stopGenerating();
  const chat = await store.getChat(id);
  if (!chat) return;
  state.chat = chat;
  state.editing = -1;
  clearError(true);
  setHash(id);
  renderThread();
  renderList();
  updateContext();
  showTitle();
  scrollToBottom(true);
}

async function persist(chat) {
  if (!chat.messages.length || chat.deleted) return;
  await store.saveChat(chat);
  if (state.chat === chat) setHash(chat.id);
  await refreshList();
}

$("new-chat").addEventListener("click", () => {
  newChat();
  closeSidebar();
});

// --- the conversation on screen --------------------------------------------------------------------------

function nearBottom() {
  const m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
}

function scrollToBottom(force) {
  if (force || nearBottom()) el.messages.scrollTop = el.messages.scrollHeight;
}

function statsText(message) {
  const s = message.stats;
  if (!s) return null;
  const parts = [];
  if (s.completion_tokens !== undefined) parts.push(`${number.format(s.completion_tokens)} tokens`);
  if (s.predicted_per_second) parts.push(`${s.predicted_per_second.toFixed(1)} tokens/s`);
  if (s.prompt_tokens !== undefined) parts.push(`prompt ${number.format(s.prompt_tokens)}${s.cached_tokens ? ` (${number.format(s.cached_tokens)} cached)` : ""}`);
  const span = h("span", { class: "stats", title: s.prompt_per_second ? `prompt read at ${s.prompt_per_second.toFixed(0)} tokens/s` : null, text: parts.join(" · ") });
  const ending = {
    stopped: "stopped",
    length: s.limited ? "cut at the max tokens setting" : "cut off: the context is full",
    error: "broken off",
  }[s.finish_reason];
  if (ending) span.append(" · ", h("span", { class: "stopped", text: ending }));
  // The server shifted the context (--context-shift): the end of this reply no longer saw the start of the chat.
  if (s.dropped_messages) span.append(" · ", h("span", { class: "stopped", text: `the oldest ${number.format(s.dropped_messages)} messages were left out: the chat no longer fits` }));
  if (s.dropped_tokens) span.append(" · ", h("span", { class: "stopped", text: `${number.format(s.dropped_tokens)} older tokens dropped to make room` }));
  return span;
}

function fileChips(attachments, removable) {
  return h("div", { class: removable ? "attachments-list" : "files" }, ...attachments.map((file, i) =>
    h("span", { class: "file-chip", title: `${file.name} (${bytes(new Blob([file.text]).size)})` }, icon("file"), h("span", { text: file.name }),
      removable ? h("button", { type: "button", "aria-label": `Remove ${file.name}`, "data-remove": i }, icon("x")) : null)));
}

// An assistant reply's body: reasoning collapsed above the answer. Re-rendered as it streams,
// keeping the reasoning block (and whether the user opened it).
function renderAssistantBody(bubble, message, streaming) {
  const split = splitReasoning(message.content);
  const reasoning = [message.reasoning, split.reasoning].filter(Boolean).join("\n\n");
  const thinking = streaming && (split.thinking || (!!message.reasoning && !split.answer));
  let details = bubble.querySelector(":scope > .reasoning");
  if (reasoning) {
    if (!details) {
      details = h("details", { class: "reasoning" }, h("summary", { text: "Reasoning" }), h("div", { class: "reasoning-body md" }));
      bubble.prepend(details);
    }
    details.classList.toggle("thinking", thinking);
    details.querySelector("summary").textContent = thinking ? "Thinking" : "Reasoning";
    details.querySelector(".reasoning-body").replaceChildren(renderMarkdown(reasoning));
  } else if (details) details.remove();
  let answer = bubble.querySelector(":scope > .answer");
  if (!answer) {
    answer = h("div", { class: "answer md", dir: "auto" });
    bubble.append(answer);
  }
  answer.replaceChildren(renderMarkdown(split.answer));
  answer.classList.remove("cursor");
  if (streaming && !thinking) (answer.lastElementChild && !answer.lastElementChild.matches(".code-block, .math-display, table") ? answer.lastElementChild : answer).classList.add("cursor");
}

function messageView(message, index, messages) {
  const generating = state.generating?.message === message;
  const last = index === messages.length - 1;
  const node = h("article", { class: "msg " + message.role, "data-index": index, "aria-label": message.role === "user" ? "You" : "Assistant" });
  if (message.role === "user") {
    if (message.attachments?.length) node.append(fileChips(message.attachments, false));
    if (state.editing === index) {
      const area = h("textarea", { "aria-label": "Edit your message", dir: "auto" });
      area.value = message.content;
      area.addEventListener("keydown", (event) => {
        if (isSendKey(event)) {
          event.preventDefault();
          resend(index, area.value);
        } else if (event.key === "Escape") {
          event.stopPropagation();
          cancelEdit();
        }
      });
      node.append(h("div", { class: "edit-box" }, area, h("div", { class: "row" },
        h("button", { type: "button", class: "btn", "data-action": "cancel-edit", text: "Cancel" }),
        h("button", { type: "button", class: "btn btn-primary", "data-action": "resend", text: "Send" }))));
      return node;
    }
    if (message.content) node.append(h("div", { class: "bubble", dir: "auto", text: message.content }));
    node.append(h("div", { class: "msg-actions" },
      iconButton("copy", "Copy this message", "copy"),
      state.generating ? null : iconButton("edit", "Edit and send again", "edit")));
    return node;
  }
  const bubble = h("div", { class: "bubble" });
  renderAssistantBody(bubble, message, generating);
  node.append(bubble);
  if (!generating) {
    node.append(h("div", { class: "msg-actions" },
      iconButton("copy", "Copy this answer", "copy"),
      last && !state.generating ? iconButton("redo", "Regenerate this answer", "regenerate") : null,
      statsText(message)));
  }
  return node;
}

function errorView() {
  const { error, retry } = state.error;
  const box = h("div", { class: "error-box", role: "alert" }, h("p", {}, h("strong", { text: "Error: " }), error.message));
  if (retry) box.append(h("button", { type: "button", class: "btn", "data-action": "retry", text: "Retry" }));
  if (error.kind === "too-long") box.append(h("button", { type: "button", class: "btn", "data-action": "new-chat", text: "New chat" }));
  return box;
}

function renderThread() {
  const chat = state.chat;
  const nodes = [];
  if (chat?.system) nodes.push(h("div", { class: "msg system-note" }, h("div", { class: "bubble", dir: "auto", text: "System prompt of this chat: " + chat.system })));
  (chat?.messages || []).forEach((m, i, all) => nodes.push(messageView(m, i, all)));
  if (state.error) nodes.push(errorView());
  el.thread.replaceChildren(...nodes);
  el.empty.hidden = nodes.length > 0;
  const editing = el.thread.querySelector(".edit-box textarea");
  if (editing) {
    editing.focus();
    editing.setSelectionRange(editing.value.length, editing.value.length);
  }
  updateComposer();
}

// While a reply streams only its body is re-rendered, at most once a frame.
let renderQueued = false;
function renderStreaming() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    const g = state.generating;
    if (!g || g.chat !== state.chat) return;
    const node = el.thread.querySelector(`article[data-index="${g.chat.messages.indexOf(g.message)}"] .bubble`);
    if (!node) return;
    const stick = nearBottom();
    renderAssistantBody(node, g.message, true);
    if (stick) scrollToBottom(true);
  });
}

function showError(error, retry) {
  state.error = { error, retry };
  renderThread();
  scrollToBottom(true);
}

function clearError(quiet) {
  if (!state.error) return;
  state.error = null;
  if (!quiet) renderThread();
}

el.thread.addEventListener("click", async (event) => {
  const copyCode = event.target.closest(".copy-code");
  if (copyCode) {
    copyText(copyCode.closest(".code-block").querySelector("pre").textContent);
    return;
  }
  const button = event.target.closest("[data-action]");
  if (!button) return;
  const index = Number(button.closest("article")?.dataset.index);
  const message = state.chat?.messages[index];
  switch (button.dataset.action) {
    case "copy":
      copyText(message.role === "assistant" ? splitReasoning(message.content).answer : message.content);
      break;
    case "edit":
      state.editing = index;
      renderThread();
      break;
    case "cancel-edit":
      cancelEdit();
      break;
    case "resend":
      resend(index, button.closest("article").querySelector("textarea").value);
      break;
    case "regenerate":
      regenerate();
      break;
    case "retry": {
      const retry = state.error?.retry;
      clearError();
      if (retry) retry();
      break;
    }
    case "new-chat":
      newChat();
      break;
  }
});

function cancelEdit() {
  state.editing = -1;
  renderThread();
  el.input.focus();
}

// --- context filling ---------------------------------------------------------------------------------------

function updateContext() {
  const n = state.info?.n_ctx;
  const messages = state.chat?.messages || [];
  const last = [...messages].reverse().find((m) => m.role === "assistant" && m.stats?.prompt_tokens !== undefined);
  const used = last ? last.stats.prompt_tokens + (last.stats.completion_tokens || 0) : 0;
  const tooLong = state.error?.error.kind === "too-long";
  const cut = last?.stats.finish_reason === "length" && !last.stats.limited;
  el.context.hidden = !n;
  if (!n) return;
  const fill = Math.min(used / n, 1);
  // A reply cut well before its own chat filled the context: other chats held the rest of a shared cache.
  const crowded = cut && !tooLong && state.info.shared_cache && used < n * 0.95;
  const full = (tooLong || cut) && !crowded;
  el.contextFill.style.width = `${(full ? 1 : fill) * 100}%`;
  el.context.classList.toggle("full", full);
  el.context.classList.toggle("warn", !full && fill >= WARN_FILL);
  let text = `${number.format(used)} / ${number.format(n)} tokens of context`;
  if (full) text = `Context full (${number.format(n)} tokens): start a new chat, or edit an earlier message`;
  else if (crowded) text += " · the last reply was cut: other chats filled the context this server shares; ask again";
  else if (fill >= WARN_FILL) text += " · almost full";
  el.contextText.textContent = text;
}

// --- sending and generating --------------------------------------------------------------------------------

function fenceFor(text) {
  const longest = Math.max(2, ...(text.match(/`+/g) || []).map((run) => run.length));
  return "`".repeat(longest + 1);
}

function apiContent(message) {
  if (message.role === "assistant") return splitReasoning(message.content).answer; // reasoning is not sent back
  const files = (message.attachments || []).map((f) => {
    const fence = fenceFor(f.text);
    return `The file ${f.name}:\n${fence}\n${f.text}\n${fence}\n\n`;
  });
  return files.join("") + message.content;
}

function requestBody(messages) {
  const system = state.chat.system ?? settings.system ?? null;
  const out = [];
  if (system) out.push({ role: "system", content: system });
  for (const m of messages) {
    const content = apiContent(m);
    if (m.role === "assistant" && !content) continue; // a reply stopped before it said anything
    out.push({ role: m.role, content });
  }
  const body = { messages: out };
  for (const name of ["temperature", "top_p", "max_tokens"]) if (settings[name] !== null && settings[name] !== undefined) body[name] = settings[name];
  return body;
}

function statsFrom(event, choice) {
  const t = event.timings;
  const stats = { finish_reason: choice.finish_reason };
  if (t) {
    Object.assign(stats, { prompt_tokens: (t.prompt_n || 0) + (t.cache_n || 0), cached_tokens: t.cache_n || 0, completion_tokens: t.predicted_n });
    if (t.predicted_per_second) stats.predicted_per_second = t.predicted_per_second;
    if (t.prompt_per_second) stats.prompt_per_second = t.prompt_per_second;
  }
  return stats;
}

async function generate() {
  const chat = state.chat;
  if (state.generating || !chat) return;
  if (!state.info && !(await loadInfo(retryLast))) return;
  clearError(true);
  const message = { id: store.newId(), role: "assistant", content: "", created: Date.now() };
  const controller = new AbortController();
  const body = requestBody(chat.messages);
  chat.messages.push(message);
  state.generating = { controller, chat, message };
  renderThread();
  scrollToBottom(true);
  let failure = null;
  let savedAt = Date.now();
  try {
    for await (const event of streamChat(body, controller.signal)) {
      if (event.usage) {
        const u = event.usage;
        message.stats = { ...message.stats, prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens, cached_tokens: u.prompt_tokens_details?.cached_tokens || 0, dropped_tokens: u.context_dropped_tokens || 0, dropped_messages: u.prompt_messages_dropped || 0 };
      }
      const choice = event.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.content) message.content += delta.content;
      const reasoning = delta.reasoning_content ?? delta.reasoning;
      if (typeof reasoning === "string" && reasoning) message.reasoning = (message.reasoning || "") + reasoning;
      if (choice.finish_reason) message.stats = { ...message.stats, ...statsFrom(event, choice), limited: Boolean(body.max_tokens || state.info?.defaults?.max_tokens) };
      renderStreaming();
      if (Date.now() - savedAt > 2000 && !chat.deleted) {
        savedAt = Date.now();
        store.saveChat(chat); // a reload in the middle of a long reply keeps what came so far
      }
    }
  } catch (error) {
    if (error.name === "AbortError") message.stats = { ...message.stats, finish_reason: "stopped" };
    else failure = error;
  }
  state.generating = null;
  if (failure) {
    if (!message.content && !message.reasoning) chat.messages.splice(chat.messages.indexOf(message), 1);
    else message.stats = { ...message.stats, finish_reason: "error" };
  }
  await persist(chat);
  if (state.chat !== chat) return;
  const stick = nearBottom();
  if (failure) showError(failure, retryLast);
  else renderThread();
  scrollToBottom(stick);
  updateContext();
}

// Retry after an error: a reply that broke off is replaced.
function retryLast() {
  const messages = state.chat?.messages || [];
  if (messages.at(-1)?.role === "assistant") messages.pop();
  if (messages.length) generate();
}

function stopGenerating() {
  state.generating?.controller.abort();
}

function isSendKey(event) {
  return event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229; // not while an IME composes
}

async function send() {
  if (state.generating) return;
  const text = el.input.value.trim();
  if (!text && !state.attachments.length) return;
  if (!state.chat) state.chat = blankChat();
  const chat = state.chat;
  if (!chat.model) chat.model = state.info?.model?.id || "";
  const message = { id: store.newId(), role: "user", content: text, created: Date.now() };
  state.editing = -1;
  if (state.attachments.length) message.attachments = state.attachments;
  chat.messages.push(message);
  if (!chat.title) chat.title = store.titleFrom(text || state.attachments[0].name);
  el.input.value = "";
  state.attachments = [];
  renderAttachments();
  autoGrow();
  showTitle();
  await persist(chat);
  await generate();
}

async function resend(index, text) {
  const chat = state.chat;
  if (state.generating || !text.trim()) return;
  chat.messages[index].content = text.trim();
  chat.messages.splice(index + 1);
  state.editing = -1;
  await persist(chat);
  await generate();
}

async function regenerate() {
  const chat = state.chat;
  if (state.generating || chat.messages.at(-1)?.role !== "assistant") return;
  chat.messages.pop();
  await generate();
}

// --- the composer ----------------------------------------------------------------------------------------------

function updateComposer() {
  const busy = !!state.generating;
  el.thread.setAttribute("aria-busy", String(busy)); // screen readers read a reply once it is whole
  el.send.classList.toggle("stop", busy);
  el.send.setAttribute("aria-label", busy ? "Stop" : "Send");
  el.send.title = busy ? "Stop the reply (Esc)" : "Send (Enter)";
  el.send.replaceChildren(icon(busy ? "stop" : "send"));
  el.send.disabled = !busy && !el.input.value.trim() && !state.attachments.length;
}

function autoGrow() {
  el.input.style.height = "auto";
  el.input.style.height = Math.min(el.input.scrollHeight, window.innerHeight * 0.4) + "px";
  updateComposer();
}

el.input.addEventListener("input", autoGrow);
el.input.addEventListener("keydown", (event) => {
  if (isSendKey(event)) {
    event.preventDefault();
    el.form.requestSubmit();
  }
});
el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.generating) stopGenerating();
  else send();
});

function renderAttachments() {
  el.attachments.replaceChildren(...(state.attachments.length ? [fileChips(state.attachments, true)] : []));
  updateComposer();
}

el.attachments.addEventListener("click", (event) => {
  const button = event.target.closest("[data-remove]");
  if (!button) return;
  state.attachments.splice(Number(button.dataset.remove), 1);
  renderAttachments();
  el.input.focus();
});

async function attach(files) {
  for (const file of files) {
    if (file.size > MAX_FILE_BYTES) {
      toast(`${file.name} is larger than ${bytes(MAX_FILE_BYTES)}: attach a smaller text file`);
      continue;
    }
    const text = await file.text();
    if (text.slice(0, 8000).includes("\u0000")) {
      toast(`${file.name} is not a text file: only text can go into the prompt`);
      continue;
    }
    state.attachments.push({ name: file.name, text });
  }
  renderAttachments();
  el.input.focus();
}

$("attach").addEventListener("click", () => el.attachFile.click());
el.attachFile.addEventListener("change", () => {
  attach([...el.attachFile.files]);
  el.attachFile.value = "";
});
el.form.addEventListener("dragover", (event) => {
  if (!event.dataTransfer?.types.includes("Files")) return;
  event.preventDefault();
  el.form.classList.add("dragging");
});
el.form.addEventListener("dragleave", () => el.form.classList.remove("dragging"));
el.form.addEventListener("drop", (event) => {
  el.form.classList.remove("dragging");
  if (!event.dataTransfer?.files.length) return;
  event.preventDefault();
  attach([...event.dataTransfer.files]);
});

// --- export and import ------------------------------------------------------------------------------------------

function fileStem(chat) {
  return (chat.title || "chat").replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-+|-+$/g, "").slice(0, 60) || "chat";
}

function exportChat(kind) {
  const chat = state.chat;
  if (!chat?.messages.length) {
    toast("Nothing to export yet: this chat is empty");
    return;
  }
  if (kind === "json") download(fileStem(chat) + ".json", "application/json", store.chatAsJson(chat));
  else download(fileStem(chat) + ".md", "text/markdown", store.chatAsMarkdown(chat));
}

$("export-md").addEventListener("click", () => exportChat("md"));
$("export-json").addEventListener("click", () => exportChat("json"));
$("import-chat").addEventListener("click", () => $("import-file").click());
$("import-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  let chat;
  try {
    chat = store.chatFromJson(await file.text(), file.name.replace(/\.json$/i, ""));
  } catch (error) {
    toast(`Cannot import ${file.name}: ${error.message}`);
    return;
  }
  await store.saveChat(chat);
  await refreshList();
  await openChat(chat.id);
  closeSidebar();
  toast(`Imported “${chat.title}”`);
});

// --- keyboard ---------------------------------------------------------------------------------------------------

document.addEventListener("keydown", (event) => {
  if (event.defaultPrevented || document.querySelector("dialog[open]")) return;
  if (event.key === "Escape") {
    if (state.generating) {
      event.preventDefault();
      stopGenerating();
    } else closeSidebar();
  } else if (event.key.toLowerCase() === "o" && event.shiftKey && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    newChat();
  }
});

// --- start --------------------------------------------------------------------------------------------------------

async function start() {
  await store.listChats(); // opens the database, and learns whether it persists
  if (!store.persistent) $("storage-note").textContent = "This browser keeps no data for this page: chats last until the tab closes.";
  const wanted = /^#chat=(.+)$/.exec(location.hash)?.[1];
  await refreshList();
  if (wanted && state.chats.some((c) => c.id === wanted)) await openChat(wanted);
  else newChat();
  await loadInfo();
  el.input.focus();
}

start();
