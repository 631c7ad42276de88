//! A loopback fake of the Telegram Bot API: `getUpdates` with Telegram's offset rule
//! (asking with offset N confirms, and forgets, every update below N) and long polling,
//! `sendMessage` recorded per chat (inline keyboards too), `editMessageText` and
//! `answerCallbackQuery` recorded, and button presses (`callback_query`) queued. Files:
//! photo, document and voice updates, `getFile` and the file route (`/file/bot<token>/
//! <path>`), and `sendDocument` (multipart) recorded. It can be taken down, rate-limit sends with 429 and
//! `retry_after`, and serve any raw update a test builds, malformed ones included.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::fake_http::{FakeHttp, Handler, Scripted};

#[derive(Debug, Default)]
struct State {
    token: String,
    /// Updates not yet confirmed, in id order.
    updates: Vec<Value>,
    next_id: i64,
    /// Every offset the client asked with.
    offsets: Vec<i64>,
    /// Every `allowed_updates` the client sent.
    allowed_updates: Vec<Value>,
    /// Delivered messages: (chat id, text).
    sent: Vec<(i64, String)>,
    rate_limited_sends: u32,
    retry_after: u64,
    /// Chats every send to which gets 429 with this `retry_after`.
    throttled: std::collections::HashMap<i64, u64>,
    /// Sends refused with 429 because their chat is throttled.
    throttled_sends: u32,
    down: bool,
    unauthorised_calls: u32,
    /// Messages sent with inline buttons: (chat, message id, callback data of each).
    keyboards: Vec<(i64, i64, Vec<String>)>,
    /// `editMessageText` calls: (chat, message id, text, whether buttons remain).
    edits: Vec<(i64, i64, String, bool)>,
    /// `answerCallbackQuery` calls: (callback query id, text).
    answers: Vec<(String, String)>,
    /// `sendChatAction` calls: (chat, action).
    actions: Vec<(i64, String)>,
    /// Files that can be fetched, by file id: (file path, bytes).
    files: std::collections::HashMap<String, (String, Vec<u8>)>,
    /// Downloads served from the file route, by file path.
    downloads: Vec<String>,
    /// `sendDocument` calls: (chat, file name, content).
    documents: Vec<(i64, String, Vec<u8>)>,
}

/// A running fake Telegram.
#[derive(Debug)]
pub struct FakeTelegram {
    pub http: FakeHttp,
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
}

fn ok(result: Value) -> Scripted {
    Scripted::json(json!({ "ok": true, "result": result }))
}

fn fail(status: u16, description: &str, retry_after: Option<u64>) -> Scripted {
    let mut body = json!({ "ok": false, "error_code": status, "description": description });
    if let Some(r) = retry_after {
        body["parameters"] = json!({ "retry_after": r });
    }
    let mut s = Scripted::json(body);
    s.status = status;
    s
}

impl FakeTelegram {
    /// Starts a fake bot whose token is `token`.
    pub async fn start(token: &str) -> FakeTelegram {
        let state = Arc::new(Mutex::new(State {
            token: token.into(),
            next_id: 1000,
            ..State::default()
        }));
        let arrived = Arc::new(Notify::new());
        let (st, notify) = (state.clone(), arrived.clone());
        let handler: Handler = Arc::new(move |req| {
            let (st, notify) = (st.clone(), notify.clone());
            Box::pin(async move { answer(&st, &notify, req).await })
        });
        let http = FakeHttp::serve(handler).await;
        FakeTelegram {
            http,
            state,
            arrived,
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake telegram state")
    }

    /// Queues an update built by `f` from its update id; returns the id.
    pub fn push_raw(&self, f: impl FnOnce(i64) -> Value) -> i64 {
        let id = {
            let mut st = self.st();
            let id = st.next_id;
            st.next_id += 1;
            let update = f(id);
            st.updates.push(update);
            id
        };
        self.arrived.notify_waiters();
        id
    }

    /// Queues a private text message from `user` (whose chat id is the same number).
    pub fn push_text(&self, user: i64, text: &str) -> i64 {
        self.push_raw(|id| {
            json!({ "update_id": id, "message": {
                "message_id": id, "date": 1_790_000_000,
                "from": { "id": user, "is_bot": false, "first_name": "T" },
                "chat": { "id": user, "type": "private" },
                "text": text } })
        })
    }

    /// Makes `bytes` fetchable as file `file_id` (`getFile`, then the file route).
    pub fn add_file(&self, file_id: &str, bytes: Vec<u8>) {
        let path = format!("documents/file_{}.bin", self.st().files.len());
        self.st().files.insert(file_id.to_owned(), (path, bytes));
    }

    /// Queues a private message from `user` carrying a file: `field` is `photo` (sizes,
    /// each `(file_id, declared size)`), `document` or `voice` (the first size only).
    pub fn push_file(
        &self,
        user: i64,
        field: &str,
        sizes: &[(&str, Option<u64>)],
        name: Option<&str>,
        caption: Option<&str>,
    ) -> i64 {
        let file = |(id, size): &(&str, Option<u64>)| {
            let mut f = json!({ "file_id": id, "file_unique_id": format!("u-{id}") });
            if let Some(s) = size {
                f["file_size"] = json!(s);
            }
            if let Some(n) = name {
                f["file_name"] = json!(n);
            }
            f
        };
        let value = if field == "photo" {
            Value::Array(sizes.iter().map(file).collect())
        } else {
            file(&sizes[0])
        };
        self.push_raw(|id| {
            let mut m = json!({
                "message_id": id, "date": 1_790_000_000,
                "from": { "id": user, "is_bot": false, "first_name": "T" },
                "chat": { "id": user, "type": "private" } });
            m[field] = value;
            if let Some(c) = caption {
                m["caption"] = json!(c);
            }
            json!({ "update_id": id, "message": m })
        })
    }

    /// The file paths downloaded so far.
    pub fn downloads(&self) -> Vec<String> {
        self.st().downloads.clone()
    }

    /// Documents sent: (chat, file name, content).
    pub fn documents(&self) -> Vec<(i64, String, Vec<u8>)> {
        self.st().documents.clone()
    }

    /// Queues a button press by `user` in `chat` (of `chat_type`) on `message_id`.
    pub fn push_press(
        &self,
        user: i64,
        chat: i64,
        chat_type: &str,
        message_id: i64,
        data: &str,
    ) -> String {
        let qid = format!("q{}", self.st().next_id);
        let q = qid.clone();
        self.push_raw(|id| {
            json!({ "update_id": id, "callback_query": {
                "id": q, "chat_instance": "1",
                "from": { "id": user, "is_bot": false, "first_name": "T" },
                "message": { "message_id": message_id, "date": 1_790_000_000,
                    "chat": { "id": chat, "type": chat_type }, "text": "prompt" },
                "data": data } })
        });
        qid
    }

    /// `sendChatAction` calls so far: (chat, action).
    pub fn actions(&self) -> Vec<(i64, String)> {
        self.st().actions.clone()
    }

    /// Messages sent with inline buttons: (chat, message id, callback data).
    pub fn keyboards(&self) -> Vec<(i64, i64, Vec<String>)> {
        self.st().keyboards.clone()
    }

    /// `editMessageText` calls: (chat, message id, text, buttons still attached).
    pub fn edits(&self) -> Vec<(i64, i64, String, bool)> {
        self.st().edits.clone()
    }

    /// The answer to button press `qid`, if it was answered.
    pub fn answer_to(&self, qid: &str) -> Option<String> {
        self.st()
            .answers
            .iter()
            .find(|(q, _)| q == qid)
            .map(|(_, t)| t.clone())
    }

    /// Every message sent to `chat`.
    pub fn sent_to(&self, chat: i64) -> Vec<String> {
        self.st()
            .sent
            .iter()
            .filter(|(c, _)| *c == chat)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Every message sent, with its chat.
    pub fn sent(&self) -> Vec<(i64, String)> {
        self.st().sent.clone()
    }

    /// Every offset `getUpdates` was called with.
    pub fn offsets(&self) -> Vec<i64> {
        self.st().offsets.clone()
    }

    /// Every `allowed_updates` value sent.
    pub fn allowed_updates(&self) -> Vec<Value> {
        self.st().allowed_updates.clone()
    }

    /// Updates not yet confirmed by an offset past them.
    pub fn unconfirmed(&self) -> usize {
        self.st().updates.len()
    }

    /// Answers every call with 502 while `down`.
    pub fn set_down(&self, down: bool) {
        self.st().down = down;
    }

    /// The next `n` sends get 429 with `retry_after` seconds.
    pub fn rate_limit_sends(&self, n: u32, retry_after: u64) {
        let mut st = self.st();
        st.rate_limited_sends = n;
        st.retry_after = retry_after;
    }

    /// Every send to `chat` gets 429 with `retry_after` seconds, until unthrottled.
    pub fn throttle_chat(&self, chat: i64, retry_after: Option<u64>) {
        let mut st = self.st();
        match retry_after {
            Some(r) => st.throttled.insert(chat, r),
            None => st.throttled.remove(&chat),
        };
    }

    /// Sends refused because their chat was throttled.
    pub fn throttled_sends(&self) -> u32 {
        self.st().throttled_sends
    }

    /// Calls made with a wrong token.
    pub fn unauthorised_calls(&self) -> u32 {
        self.st().unauthorised_calls
    }

    /// Waits until `pred` holds of the sent messages, or `limit` passes.
    pub async fn wait_for(&self, limit: Duration, pred: impl Fn(&[(i64, String)]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if pred(&self.st().sent) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn answer(
    state: &Mutex<State>,
    arrived: &Notify,
    req: crate::fake_http::Received,
) -> Scripted {
    let (token, down) = {
        let st = state.lock().expect("state");
        (st.token.clone(), st.down)
    };
    if down {
        return Scripted::status(502);
    }
    // The file route: the token in the path, as Telegram's own.
    if let Some(path) = req.path.strip_prefix(&format!("/file/bot{token}/")) {
        let mut st = state.lock().expect("state");
        let found = st
            .files
            .values()
            .find(|(p, _)| p == path)
            .map(|(_, b)| b.clone());
        return match found {
            Some(bytes) => {
                st.downloads.push(path.to_owned());
                Scripted::bytes(bytes)
            }
            None => Scripted::status(404),
        };
    }
    if req.path == "/bot{token}/sendDocument".replace("{token}", &token) {
        return send_document(state, &req);
    }
    let Some(method) = req.path.strip_prefix(&format!("/bot{token}/")) else {
        state.lock().expect("state").unauthorised_calls += 1;
        return fail(401, "Unauthorized", None);
    };
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    match method {
        "getUpdates" => {
            let offset = body.get("offset").and_then(Value::as_i64).unwrap_or(0);
            let limit = body.get("limit").and_then(Value::as_u64).unwrap_or(100) as usize;
            let timeout = body.get("timeout").and_then(Value::as_u64).unwrap_or(0);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout.min(5));
            {
                let mut st = state.lock().expect("state");
                st.offsets.push(offset);
                st.allowed_updates
                    .push(body.get("allowed_updates").cloned().unwrap_or(Value::Null));
            }
            loop {
                let notified = arrived.notified();
                let batch: Vec<Value> = {
                    let mut st = state.lock().expect("state");
                    // Telegram's rule: an offset confirms every update below it.
                    st.updates
                        .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= offset);
                    st.updates.iter().take(limit).cloned().collect()
                };
                if !batch.is_empty() || tokio::time::Instant::now() >= deadline {
                    return ok(Value::Array(batch));
                }
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        }
        "sendMessage" => {
            let mut st = state.lock().expect("state");
            if st.rate_limited_sends > 0 {
                st.rate_limited_sends -= 1;
                let r = st.retry_after;
                return fail(429, &format!("Too Many Requests: retry after {r}"), Some(r));
            }
            let chat = body.get("chat_id").and_then(Value::as_i64);
            if let Some(r) = chat.and_then(|c| st.throttled.get(&c).copied()) {
                st.throttled_sends += 1;
                return fail(429, &format!("Too Many Requests: retry after {r}"), Some(r));
            }
            let text = body.get("text").and_then(Value::as_str);
            match (chat, text) {
                (Some(c), Some(t)) if !t.is_empty() && t.encode_utf16().count() <= 4096 => {
                    st.sent.push((c, t.to_owned()));
                    let message_id = st.sent.len() as i64;
                    if let Some(rows) = body.pointer("/reply_markup/inline_keyboard") {
                        let data = rows
                            .as_array()
                            .into_iter()
                            .flatten()
                            .flat_map(|r| r.as_array().cloned().unwrap_or_default())
                            .filter_map(|b| b["callback_data"].as_str().map(str::to_owned))
                            .collect();
                        st.keyboards.push((c, message_id, data));
                    }
                    ok(json!({ "message_id": message_id, "chat": { "id": c }, "text": t }))
                }
                _ => fail(400, "Bad Request: message text is empty or too long", None),
            }
        }
        "editMessageText" => {
            let chat = body.get("chat_id").and_then(Value::as_i64);
            let message = body.get("message_id").and_then(Value::as_i64);
            let text = body.get("text").and_then(Value::as_str);
            match (chat, message, text) {
                (Some(c), Some(m), Some(t)) => {
                    let buttons = body.get("reply_markup").is_some();
                    state
                        .lock()
                        .expect("state")
                        .edits
                        .push((c, m, t.to_owned(), buttons));
                    ok(json!({ "message_id": m, "chat": { "id": c }, "text": t }))
                }
                _ => fail(400, "Bad Request: message to edit not found", None),
            }
        }
        "answerCallbackQuery" => {
            let Some(q) = body.get("callback_query_id").and_then(Value::as_str) else {
                return fail(400, "Bad Request: query id is missing", None);
            };
            let text = body.get("text").and_then(Value::as_str).unwrap_or_default();
            state
                .lock()
                .expect("state")
                .answers
                .push((q.to_owned(), text.to_owned()));
            ok(Value::Bool(true))
        }
        "getFile" => {
            let id = body
                .get("file_id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let st = state.lock().expect("state");
            match st.files.get(id) {
                Some((path, bytes)) => {
                    ok(json!({ "file_id": id, "file_unique_id": format!("u-{id}"),
                    "file_size": bytes.len(), "file_path": path }))
                }
                None => fail(400, "Bad Request: invalid file_id", None),
            }
        }
        "getMe" => ok(json!({ "id": 1, "is_bot": true, "first_name": "IronClaw",
                                "username": "ironclaw_test_bot" })),
        "sendChatAction" => {
            match (
                body.get("chat_id").and_then(Value::as_i64),
                body.get("action").and_then(Value::as_str),
            ) {
                (Some(c), Some(a)) => {
                    state.lock().expect("state").actions.push((c, a.to_owned()));
                    ok(Value::Bool(true))
                }
                _ => fail(400, "Bad Request: chat_id and action are required", None),
            }
        }
        _ => fail(404, "Not Found", None),
    }
}

/// `sendDocument` as multipart/form-data: the `chat_id` field and the `document` file.
fn send_document(state: &Mutex<State>, req: &crate::fake_http::Received) -> Scripted {
    let Some(boundary) = req
        .header("content-type")
        .and_then(|v| v.split("boundary=").nth(1))
        .map(|b| format!("--{}", b.trim_matches('"')))
    else {
        return fail(400, "Bad Request: not multipart", None);
    };
    let body = &req.body;
    let mut chat = None;
    let mut file: Option<(String, Vec<u8>)> = None;
    let parts = split(body, boundary.as_bytes());
    for part in parts {
        let Some(head_end) = find(part, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&part[..head_end]).to_string();
        let mut content = &part[head_end + 4..];
        content = content.strip_suffix(b"\r\n").unwrap_or(content);
        let name = head
            .split("name=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("");
        match name {
            "chat_id" => chat = String::from_utf8_lossy(content).trim().parse::<i64>().ok(),
            "document" => {
                let filename = head
                    .split("filename=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_owned();
                file = Some((filename, content.to_vec()));
            }
            _ => {}
        }
    }
    match (chat, file) {
        (Some(c), Some((name, bytes))) => {
            state
                .lock()
                .expect("state")
                .documents
                .push((c, name.clone(), bytes));
            ok(json!({ "message_id": 1, "chat": { "id": c }, "document": { "file_name": name } }))
        }
        _ => fail(400, "Bad Request: chat_id and document are required", None),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The parts of a multipart body between `boundary` lines.
fn split<'a>(body: &'a [u8], boundary: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(at) = find(rest, boundary) {
        let after = &rest[at + boundary.len()..];
        if after.starts_with(b"--") {
            break;
        }
        let after = after.strip_prefix(b"\r\n").unwrap_or(after);
        let end = find(after, boundary).unwrap_or(after.len());
        parts.push(&after[..end]);
        rest = &after[end..];
    }
    parts
}
