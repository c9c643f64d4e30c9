// Talking to the llamabox server: the API key, JSON requests, the streamed chat, and errors turned
// into something a person can act on. Every request goes to the page's own origin.

const KEY_STORE = "llamabox-api-key";

// What went wrong, in words for the chat, with a kind the page acts on
// (key: ask for the key; busy and gone: retry later; too-long: the conversation no longer fits).
export class ApiError extends Error {
  constructor(kind, message, status = 0) {
    super(message);
    this.kind = kind;
    this.status = status;
  }
}

let askKey = async () => null;
let pendingAsk = null;

// `ask(refused)` shows the page's key prompt and resolves to the key entered, or null if dismissed.
export function setKeyAsker(ask) {
  askKey = ask;
}

// With --api-key every API route wants the key: asked for once, kept for this tab
// (sessionStorage), sent as a Bearer token, asked for again when the server refuses it.
async function keyAfter401(sent) {
  if (sessionStorage.getItem(KEY_STORE) !== sent) return true; // another request already got a new key
  if (!pendingAsk) {
    pendingAsk = askKey(sent !== null).finally(() => {
      pendingAsk = null;
    });
  }
  const entered = ((await pendingAsk) || "").trim();
  if (!entered) return false;
  sessionStorage.setItem(KEY_STORE, entered);
  return true;
}

export async function api(path, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = { ...(options.headers || {}), ...(key ? { Authorization: "Bearer " + key } : {}) };
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError("gone", `Cannot reach the llamabox server at ${location.host}: is it still running? Start it again, then retry.`);
    }
    if (response.status !== 401) return response;
    if (!(await keyAfter401(key))) {
      throw new ApiError("key", key
        ? "The server refused the API key. Enter the key it was started with (--api-key) to go on."
        : "This server wants an API key (it was started with --api-key); enter it to chat.", 401);
    }
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body?.error?.message || body?.error || body?.message || message;
  } catch {
    // not JSON: keep the status line
  }
  return classify(response.status, String(message), response.headers.get("Retry-After"));
}

function classify(status, message, retryAfter) {
  if (status === 503) {
    const wait = retryAfter ? ` (the server suggests ${retryAfter} s)` : "";
    return new ApiError("busy", `The server is busy: every slot is taken and the waiting line is full. Retry in a moment${wait}.`, status);
  }
  if (status === 400 && /context holds|context window|context size|too long/i.test(message)) {
    return new ApiError("too-long", `This conversation no longer fits in the model's context: ${message}. Start a new chat, or edit or shorten earlier messages.`, status);
  }
  if (status === 401) return new ApiError("key", message, status);
  return new ApiError("server", `The server answered ${status}: ${message}`, status);
}

export async function getJson(path) {
  const response = await api(path);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// Streams a chat completion: yields each server-sent event's JSON (chunks with choices, the usage
// chunk). Aborting `signal` closes the connection, which ends the generation on the server too.
export async function* streamChat(body, signal) {
  const response = await api("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw new ApiError("gone", "The connection to the server broke off in the middle of the reply: is it still running? Retry when it is.");
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) {
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data || data === "[DONE]") continue;
        const json = JSON.parse(data);
        if (json.error) throw classify(json.error.code || 500, json.error.message || String(json.error), null);
        yield json;
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // a reader that stops early closes the connection (and the generation)
  }
}
