// The chat page of `mmgpt serve`: one conversation with the model through the server's OpenAI-compatible API.
// Every text from the user or the model goes into the DOM as textContent, never as HTML: the model's output is
// untrusted, and a reply such as "<img onerror=...>" must show as those characters.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), form = $("composer"), prompt = $("prompt"), send = $("send"), fileInput = $("file");
const errorBox = $("error"), attachment = $("attachment"), thumb = $("thumb"), overlay = $("drop-overlay");

// The turns sent with every request, in the API's form: the model has no memory between requests, so a second
// question about the same image carries the first turn's image (as a data URL) and the model's reply.
let history = [];
let image = null; // the data URL of the image attached to the next message
let modelName = null; // from GET /v1/models; the request omits "model" until it is known
let controller = null; // aborts the answer being streamed (the Send button reads "Stop" meanwhile)
let chatId = 0; // bumped by "New chat": an answer still arriving from the old chat must not land in the new one

function showError(message) {
  errorBox.textContent = "Error: " + message;
  errorBox.hidden = false;
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
}

function addMessage(role, text, imageUrl) {
  $("hint").hidden = true;
  const item = document.createElement("div");
  item.className = "msg " + role;
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "Image sent with this message";
    item.append(img);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  log.append(item);
  log.scrollTop = log.scrollHeight;
  return item;
}

function setImage(dataUrl) {
  image = dataUrl;
  attachment.hidden = dataUrl === null;
  if (dataUrl === null) thumb.removeAttribute("src");
  else thumb.src = dataUrl;
}

function attach(file) {
  if (!file) return;
  // Only the declared type is checked here: whether the bytes decode is for the server to say.
  if (!file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (its type is ${file.type || "unknown"})`);
    return;
  }
  clearError();
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.onerror = () => showError(`could not read ${file.name}`);
  reader.readAsDataURL(file);
}

function newChat() {
  chatId += 1;
  if (controller) controller.abort();
  history = [];
  setImage(null);
  clearError();
  log.querySelectorAll(".msg").forEach((el) => el.remove());
  $("hint").hidden = false;
  prompt.value = "";
  prompt.focus();
}


// The number in a settings field, or undefined (left out of the request, the server's default) when empty.
function setting(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

// The message of an error response: the API's {"error": {"message"}}, else whatever the body says.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.error && body.error.message) return body.error.message;
    if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON: fall through to the raw text */ }
  return `${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
}

// Yields the payload of each "data:" line of a server-sent-events body as it arrives. EventSource would do this
// but cannot POST; a reader on fetch()'s body can.
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value, { stream: !done });
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = done ? "" : lines.pop(); // the last line may still be incomplete
    for (const line of lines) {
      if (line.startsWith("data:")) yield line.slice(5).replace(/^ /, "");
    }
    if (done) return;
  }
}

async function ask() {
  const text = prompt.value.trim();
  if (!text && !image) return;
  clearError();
  const id = chatId;
  const content = [];
  if (image) content.push({ type: "image_url", image_url: { url: image } });
  if (text) content.push({ type: "text", text });
  const user = { role: "user", content };
  const sentImage = image;
  const userEl = addMessage("user", text, sentImage);
  const replyEl = addMessage("assistant", "");
  replyEl.classList.add("pending");
  const replyText = replyEl.querySelector(".text");
  prompt.value = "";
  setImage(null);

  controller = new AbortController();
  send.textContent = "Stop";
  let answer = "", finished = false;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: modelName ?? undefined,
        messages: [...history, user],
        stream: true,
        temperature: setting("temperature"),
        max_tokens: setting("max-tokens"),
      }),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server stopped with an error");
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) {
        answer += piece;
        replyText.textContent = answer;
        log.scrollTop = log.scrollHeight;
      }
    }
    if (!finished) throw new Error("the connection closed before the answer was complete");
  } catch (err) {
    const stopped = err.name === "AbortError";
    if (id !== chatId) return; // "New chat" stopped it: the old conversation is gone
    if (!stopped) showError(err.message);
    if (!stopped || !answer) {
      // The turn failed: it leaves the conversation, and the composer gets it back to edit and resend.
      userEl.remove();
      replyEl.remove();
      if (!prompt.value) prompt.value = text;
      if (!image) setImage(sentImage);
      return;
    }
    finished = true; // stopped by the user: the partial answer stays, as it was shown
  } finally {
    replyEl.classList.remove("pending");
    controller = null;
    send.textContent = "Send";
  }
  if (finished) history.push(user, { role: "assistant", content: answer });
  prompt.focus();
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (controller) controller.abort();
  else ask();
});

prompt.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter breaks the line; not while an input method is composing a character.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

fileInput.addEventListener("change", () => {
  attach(fileInput.files[0]);
  fileInput.value = ""; // choosing the same file again still fires "change"
});
$("remove-image").addEventListener("click", () => setImage(null));
$("new-chat").addEventListener("click", newChat);

// Dropping a file anywhere on the page attaches it; the overlay shows while files are dragged over the window.
let dragDepth = 0;
const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types).includes("Files");
document.addEventListener("dragenter", (event) => {
  if (!hasFiles(event)) return;
  dragDepth += 1;
  overlay.hidden = false;
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) overlay.hidden = true;
});
document.addEventListener("dragover", (event) => {
  if (hasFiles(event)) event.preventDefault(); // allows the drop
});
document.addEventListener("drop", (event) => {
  event.preventDefault(); // the browser would otherwise open the file in place of the page
  dragDepth = 0;
  overlay.hidden = true;
  attach(event.dataTransfer && event.dataTransfer.files[0]);
});

fetch("v1/models")
  .then(async (response) => {
    if (!response.ok) throw new Error(await errorMessage(response));
    const { data } = await response.json();
    if (data && data.length) {
      modelName = data[0].id;
      $("model").textContent = modelName;
    }
  })
  .catch((err) => showError("could not list the models: " + err.message));
