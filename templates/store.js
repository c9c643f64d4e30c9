// Conversations kept in this browser (IndexedDB), and their export and import.
//
// A chat is {id, title, created, updated, model, system?, messages: [message]}; a message is
// {id, role: "user" | "assistant", content, reasoning?, attachments?: [{name, text}], stats?}.
// Where IndexedDB is unavailable (some private windows) chats live in memory for this visit only.

import { splitReasoning } from "./reasoning.js";

const DB_NAME = "llamabox";
const STORE = "chats";
export const EXPORT_FORMAT = "llamabox-chat";

let dbPromise = null;
const memory = new Map();
export let persistent = true;

function openDb() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve) => {
      let request;
      try {
        request = indexedDB.open(DB_NAME, 1);
      } catch {
        resolve(null);
        return;
      }
      request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => resolve(null);
    }).then((db) => {
      persistent = db !== null;
      return db;
    });
  }
  return dbPromise;
}

function run(mode, action) {
  return openDb().then((db) => {
    if (!db) return action(null);
    return new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const request = action(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(request?.result);
      tx.onerror = () => reject(tx.error);
    });
  });
}

export function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : Date.now().toString(36) + Math.random().toString(36).slice(2);
}

// Every chat, newest first.
export async function listChats() {
  const chats = await run("readonly", (store) => (store ? store.getAll() : null));
  return (chats ?? [...memory.values()]).sort((a, b) => b.updated - a.updated);
}

export async function getChat(id) {
  const chat = await run("readonly", (store) => (store ? store.get(id) : null));
  return chat ?? memory.get(id) ?? null;
}

export async function saveChat(chat) {
  chat.updated = Date.now();
  const copy = JSON.parse(JSON.stringify(chat)); // IndexedDB stores plain data, without the page's live state
  await run("readwrite", (store) => (store ? store.put(copy) : memory.set(copy.id, copy)));
}

export async function deleteChat(id) {
  await run("readwrite", (store) => (store ? store.delete(id) : memory.delete(id)));
}

// --- export and import -----------------------------------------------------------------------------

export function chatAsJson(chat) {
  const messages = [];
  if (chat.system) messages.push({ role: "system", content: chat.system });
  for (const m of chat.messages) {
    const out = { role: m.role, content: m.content };
    if (m.reasoning) out.reasoning = m.reasoning;
    if (m.attachments?.length) out.attachments = m.attachments;
    if (m.stats) out.stats = m.stats;
    messages.push(out);
  }
  return JSON.stringify({ format: EXPORT_FORMAT, version: 1, title: chat.title, created: chat.created, model: chat.model, messages }, null, 2);
}

export function chatAsMarkdown(chat) {
  const parts = [`# ${chat.title}`, ""];
  if (chat.model) parts.push(`Model: ${chat.model}`, "");
  if (chat.system) parts.push("## System", "", chat.system, "");
  for (const m of chat.messages) {
    parts.push(m.role === "user" ? "## User" : "## Assistant", "");
    for (const a of m.attachments || []) parts.push(`Attached file \`${a.name}\`:`, "", "````", a.text, "````", "");
    const split = m.role === "assistant" ? splitReasoning(m.content) : { reasoning: "", answer: m.content };
    const reasoning = [m.reasoning, split.reasoning].filter(Boolean).join("\n\n");
    if (reasoning) parts.push("<details><summary>Reasoning</summary>", "", reasoning, "", "</details>", "");
    parts.push(split.answer, "");
  }
  return parts.join("\n");
}

const ROLES = new Set(["user", "assistant", "system"]);

// A chat from an exported file: this page's JSON export, or any {messages: [{role, content}]}
// (the terminal chat's /save FILE.json writes one). Throws an Error that says what is wrong.
export function chatFromJson(text, fallbackTitle) {
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new Error("this file is not JSON; import a chat exported as JSON");
  }
  const messages = Array.isArray(data) ? data : data?.messages;
  if (!Array.isArray(messages)) throw new Error("this JSON has no 'messages' list");
  const chat = { id: newId(), title: "", created: Date.now(), updated: Date.now(), model: typeof data.model === "string" ? data.model : "", messages: [] };
  for (const [i, m] of messages.entries()) {
    if (!m || !ROLES.has(m.role) || typeof m.content !== "string") throw new Error(`message ${i + 1} needs a role (user, assistant or system) and a text content`);
    if (m.role === "system") {
      chat.system = m.content;
      continue;
    }
    const message = { id: newId(), role: m.role, content: m.content };
    if (typeof m.reasoning === "string" && m.reasoning) message.reasoning = m.reasoning;
    if (Array.isArray(m.attachments)) {
      message.attachments = m.attachments.filter((a) => a && typeof a.name === "string" && typeof a.text === "string").map((a) => ({ name: a.name, text: a.text }));
    }
    if (m.stats && typeof m.stats === "object") message.stats = sanitizedStats(m.stats);
    chat.messages.push(message);
  }
  chat.title = (typeof data.title === "string" && data.title.trim()) || titleFrom(chat.messages.find((m) => m.role === "user")?.content || "") || fallbackTitle;
  return chat;
}

function sanitizedStats(stats) {
  const out = {};
  for (const key of ["prompt_tokens", "completion_tokens", "cached_tokens", "predicted_per_second", "prompt_per_second"]) {
    if (Number.isFinite(stats[key])) out[key] = stats[key];
  }
  if (typeof stats.finish_reason === "string") out.finish_reason = stats.finish_reason.slice(0, 20);
  if (typeof stats.limited === "boolean") out.limited = stats.limited;
  return out;
}

export function titleFrom(text) {
  const line = text.replace(/\s+/g, " ").trim();
  return line.length > 60 ? line.slice(0, 57).trimEnd() + "…" : line;
}
