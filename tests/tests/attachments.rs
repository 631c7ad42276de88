//! Photos, documents and voice notes through the real `serve` under gVisor, a fake
//! Telegram that serves files (`getFile`, the file route, `sendDocument`), a scripted
//! model and a fake transcriber: what reaches the model, in each provider's own wire
//! format; what is refused, with which notice, while the agent and another session keep
//! working; and that nothing of any of it lies in plaintext under the state directory.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tests::fake_http::FakeHttp;
use tests::fake_model::{ECHO, start_tool_model};
use tests::fake_telegram::FakeTelegram;
use tests::fake_transcriber::FakeTranscriber;
use tests::service::Serve;

const PERSON: i64 = 5150;
const OTHER: i64 = 5151;
const TOKEN: &str = "77:files";

/// A JPEG as far as any sniffer can tell, carrying a marker to look for at rest.
fn photo() -> Vec<u8> {
    let mut b = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00".to_vec();
    b.extend_from_slice(b"PHOTO-MARKER-5e1f0c77");
    b.extend_from_slice(b"\xff\xd9");
    b
}

/// A one-page PDF whose content stream (deflated) shows `text`.
fn pdf(text: &str) -> Vec<u8> {
    let content = format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET");
    pdf_of(content.as_bytes())
}

fn pdf_of(content: &[u8]) -> Vec<u8> {
    let data = miniz_oxide::deflate::compress_to_vec_zlib(content, 6);
    let mut f = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n".to_vec();
    f.extend_from_slice(
        format!(
            "4 0 obj << /Filter /FlateDecode /Length {} >>\nstream\n",
            data.len()
        )
        .as_bytes(),
    );
    f.extend_from_slice(&data);
    f.extend_from_slice(b"\nendstream\nendobj\ntrailer << /Root 1 0 R >>\n%%EOF\n");
    f
}

/// A PDF built to exhaust a reader: a 256 MiB deflate bomb in a text object.
fn pdf_bomb() -> Vec<u8> {
    let mut bomb = b"BT (bomb start) Tj ".to_vec();
    bomb.resize(256 * 1024 * 1024, b' ');
    bomb.extend_from_slice(b"(bomb end) Tj ET");
    pdf_of(&bomb)
}

/// A zip whose one member inflates to 100 MiB: what a "document" bomb looks like.
fn zip_bomb() -> Vec<u8> {
    let member = miniz_oxide::deflate::compress_to_vec(&vec![0u8; 100 * 1024 * 1024], 9);
    let mut z = b"PK\x03\x04\x14\x00\x00\x00\x08\x00".to_vec();
    z.extend_from_slice(&[0; 16]);
    z.extend_from_slice(b"\x08\x00\x00\x00report.pdf");
    z.extend_from_slice(&member);
    z
}

fn ogg(marker: &str) -> Vec<u8> {
    let mut b = b"OggS\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00".to_vec();
    b.extend_from_slice(marker.as_bytes());
    b
}

/// The tool calls the scripted model makes: `send me my shopping list` writes a note
/// and sends it back as a document; anything else is echoed.
fn script(text: &str) -> Vec<(&'static str, Value)> {
    if text.starts_with("summarise") {
        return vec![(
            "note_write",
            json!({ "name": "report", "body": "a harvest report" }),
        )];
    }
    if text == "send me my shopping list" {
        return vec![
            (
                "note_write",
                json!({ "name": "shopping", "body": "eggs, milk, DOC-MARKER-91c2" }),
            ),
            ("note_send", json!({ "name": "shopping" })),
        ];
    }
    vec![]
}

struct Rig {
    rt: tokio::runtime::Runtime,
    tg: FakeTelegram,
    model: FakeHttp,
    transcriber: FakeTranscriber,
    s: Serve,
}

fn rig(provider: &str) -> Rig {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start(TOKEN));
    let model = rt.block_on(start_tool_model(Arc::new(script)));
    let transcriber = rt.block_on(FakeTranscriber::start());
    let mut s = Serve::init("");
    let token = s.secret_file("tg.token", TOKEN);
    let key = s.secret_file("model.key", "sk-test");
    std::fs::write(
        s.state.join("config.toml"),
        format!(
            "[model]\nprovider = \"{provider}\"\nbase_url = \"{}\"\nmodel = \"m\"\n\
             api_key_file = \"{}\"\naccepts_images = true\n\n\
             [sandbox]\nruntime = \"gvisor\"\n\n\
             [attachments]\nmax_bytes = 1048576\n\n\
             [transcription]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"whisper-1\"\n\n\
             [channels.telegram]\ntoken_file = \"{}\"\napi_base = \"{}\"\n\
             allowed_users = [{PERSON}, {OTHER}]\npoll_timeout_secs = 1\n",
            model.base(),
            key.display(),
            transcriber.http.base(),
            token.display(),
            tg.http.base()
        ),
    )
    .unwrap();
    s.start();
    Rig {
        rt,
        tg,
        model,
        transcriber,
        s,
    }
}

impl Rig {
    /// Waits until `pred` holds of what `chat` was sent.
    fn wait_sent(&self, chat: i64, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let ok = self
            .rt
            .block_on(self.tg.wait_for(Duration::from_secs(120), |sent| {
                sent.iter().any(|(c, t)| *c == chat && pred(t))
            }));
        assert!(
            ok,
            "no {what} for {chat}: {:?}\n{}",
            self.tg.sent_to(chat),
            self.s.log_text()
        );
        self.tg
            .sent_to(chat)
            .into_iter()
            .rfind(|t| pred(t))
            .unwrap()
    }

    /// The last user message of the last model request, as sent.
    fn last_user_message(&self) -> Value {
        let requests = self.model.received();
        let body = requests.last().unwrap().json();
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|m| m["role"] == "user")
            .cloned()
            .unwrap()
    }
}

#[test]
fn a_photo_reaches_openai_as_an_image_url_data_uri() {
    let r = rig("openai");
    let bytes = photo();
    r.tg.add_file("ph-big", bytes.clone());
    r.tg.push_file(
        PERSON,
        "photo",
        &[("ph-small", Some(90)), ("ph-big", Some(bytes.len() as u64))],
        None,
        Some("what is this?"),
    );
    r.wait_sent(PERSON, "echo", |t| {
        t.starts_with(&format!("{ECHO}what is this?"))
    });
    let user = r.last_user_message();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let parts = user["content"].as_array().unwrap();
    assert_eq!(parts[0]["type"], "text", "{user}");
    let image = parts.iter().find(|p| p["type"] == "image_url").unwrap();
    assert_eq!(
        image["image_url"]["url"],
        format!("data:image/jpeg;base64,{b64}")
    );
    assert_eq!(r.tg.downloads().len(), 1, "only the chosen size is fetched");
}

#[test]
fn a_photo_reaches_anthropic_as_an_image_block() {
    let r = rig("anthropic");
    let bytes = photo();
    r.tg.add_file("ph", bytes.clone());
    r.tg.push_file(PERSON, "photo", &[("ph", None)], None, Some("and this?"));
    r.wait_sent(PERSON, "echo", |t| {
        t.starts_with(&format!("{ECHO}and this?"))
    });
    let user = r.last_user_message();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let image = user["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "image")
        .cloned()
        .unwrap_or_else(|| panic!("{user}"));
    assert_eq!(
        image["source"],
        json!({ "type": "base64", "media_type": "image/jpeg", "data": b64 })
    );
    assert_eq!(
        r.model.received().last().unwrap().path,
        "/v1/messages",
        "spoken to as Anthropic"
    );
}

#[test]
fn documents_and_voice_notes_reach_the_model_bad_files_get_notices_and_nothing_is_plain_at_rest() {
    let mut r = rig("openai");
    // A PDF's text, read inside the box, labelled as outside content.
    r.tg.add_file("doc", pdf("The harvest was 4711 apples"));
    r.tg.push_file(
        PERSON,
        "document",
        &[("doc", None)],
        Some("report.pdf"),
        Some("summarise"),
    );
    r.wait_sent(PERSON, "done", |t| t == "done");
    let user = r.last_user_message().to_string();
    assert!(user.contains("The harvest was 4711 apples"), "{user}");
    assert!(
        user.contains("Outside content") && user.contains("report.pdf"),
        "{user}"
    );

    // A voice note, transcribed by the fake from the bytes the control plane fetched.
    let voice = ogg("VOICE-MARKER-3a9d");
    r.transcriber.knows(&voice, "please water the tomatoes");
    r.tg.add_file("vn", voice.clone());
    let sent = std::time::Instant::now();
    r.tg.push_file(
        PERSON,
        "voice",
        &[("vn", Some(voice.len() as u64))],
        None,
        None,
    );
    r.wait_sent(PERSON, "transcript echo", |t| {
        t.contains("please water the tomatoes")
    });
    eprintln!(
        "figure: voice note arrival to its reply with the transcript: {} ms",
        sent.elapsed().as_millis()
    );
    assert!(
        r.last_user_message()
            .to_string()
            .contains("<transcript>\\nplease water the tomatoes")
    );

    // A voice note the transcriber refuses: the model is told, and says so.
    r.tg.add_file("vn-bad", ogg("NOT-SPEECH"));
    r.tg.push_file(PERSON, "voice", &[("vn-bad", None)], None, None);
    r.wait_sent(PERSON, "refusal", |t| {
        t.contains("could not be transcribed")
    });

    // Refused before anything is passed on, each with its fixed notice.
    let too_large = control_plane::files::notice::FILE_TOO_LARGE;
    let not_accepted = control_plane::files::notice::FILE_NOT_ACCEPTED;
    // Declared too large: not even downloaded.
    r.tg.add_file("huge", vec![b'a'; 16]);
    r.tg.push_file(
        PERSON,
        "document",
        &[("huge", Some(50 * 1024 * 1024))],
        Some("a.txt"),
        None,
    );
    r.wait_sent(PERSON, "too large", |t| t == too_large);
    // Declared small, but more bytes than the limit when fetched.
    r.tg.add_file("liar", vec![b'a'; 2 * 1024 * 1024]);
    r.tg.push_file(
        PERSON,
        "document",
        &[("liar", Some(10))],
        Some("b.txt"),
        None,
    );
    let downloads = r.tg.downloads().len();
    r.rt.block_on(r.tg.wait_for(Duration::from_secs(60), |sent| {
        sent.iter()
            .filter(|(c, t)| *c == PERSON && t == too_large)
            .count()
            >= 2
    }));
    assert_eq!(
        r.tg.sent_to(PERSON)
            .iter()
            .filter(|t| *t == too_large)
            .count(),
        2
    );
    // An executable called a PDF, and a zip bomb called a document.
    r.tg.add_file("elf", b"\x7fELF\x02\x01\x01\x00rest".to_vec());
    r.tg.push_file(
        PERSON,
        "document",
        &[("elf", None)],
        Some("invoice.pdf"),
        Some("read this"),
    );
    r.tg.add_file("zip", zip_bomb());
    r.tg.push_file(
        PERSON,
        "document",
        &[("zip", None)],
        Some("report.pdf"),
        None,
    );
    r.rt.block_on(r.tg.wait_for(Duration::from_secs(60), |sent| {
        sent.iter()
            .filter(|(c, t)| *c == PERSON && t == not_accepted)
            .count()
            >= 2
    }));
    assert_eq!(
        r.tg.sent_to(PERSON)
            .iter()
            .filter(|t| *t == not_accepted)
            .count(),
        2
    );
    assert!(r.tg.downloads().len() > downloads);
    // The caption of the refused executable still reached the agent, without it.
    r.wait_sent(PERSON, "caption echo", |t| {
        t.starts_with(&format!("{ECHO}read this"))
    });

    // A PDF built to explode a reader is read up to the caps, and the agent answers.
    r.tg.add_file("bomb", pdf_bomb());
    r.tg.push_file(
        PERSON,
        "document",
        &[("bomb", None)],
        Some("bomb.pdf"),
        Some("and this one"),
    );
    r.wait_sent(PERSON, "bomb echo", |t| {
        t.starts_with(&format!("{ECHO}and this one"))
    });
    let user = r.last_user_message().to_string();
    assert!(
        user.contains("bomb start") && user.contains("cut at the reading limit"),
        "{user}"
    );
    // The other person's session is unaffected, and so is this one.
    r.tg.push_text(OTHER, "still there?");
    r.wait_sent(OTHER, "other echo", |t| {
        t.starts_with(&format!("{ECHO}still there?"))
    });
    r.tg.push_text(PERSON, "and you?");
    r.wait_sent(PERSON, "echo", |t| {
        t.starts_with(&format!("{ECHO}and you?"))
    });

    // A note sent back as a document, with sendDocument.
    r.tg.push_text(PERSON, "send me my shopping list");
    let ok = r.rt.block_on(async {
        for _ in 0..600 {
            if !r.tg.documents().is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(
        ok,
        "no document: {:?}\n{}",
        r.tg.sent_to(PERSON),
        r.s.log_text()
    );
    let (chat, name, content) = r.tg.documents()[0].clone();
    assert_eq!((chat, name.as_str()), (PERSON, "shopping.md"));
    assert_eq!(content, b"eggs, milk, DOC-MARKER-91c2");

    // The control plane's own record of where notes came from: the note written while
    // reading the PDF is marked, and so is the shopping list, written while the session
    // was still tainted by the document.
    let marked: Vec<u64> =
        r.s.audit_of("outbox_ingested")
            .iter()
            .filter(|e| e["detail"]["notes"].as_u64() == Some(1))
            .map(|e| e["detail"]["notes_after_outside_content"].as_u64().unwrap())
            .collect();
    assert_eq!(marked, vec![1, 1], "{marked:?}");

    // At rest: not one of the files' bytes, the transcript or the extracted text is in
    // plaintext anywhere under the state directory, nor in serve's log.
    r.s.stop();
    let secrets: [&[u8]; 6] = [
        b"PHOTO-MARKER-5e1f0c77",
        b"VOICE-MARKER-3a9d",
        b"please water the tomatoes",
        b"4711 apples",
        b"DOC-MARKER-91c2",
        b"bomb start",
    ];
    let scanned = tests::service::assert_nothing_plain(&r.s.state, &secrets);
    let log = std::fs::read(&r.s.log).unwrap();
    for s in secrets {
        assert!(
            !tests::service::contains(&log, s),
            "{} in serve's log",
            String::from_utf8_lossy(s)
        );
    }
    assert!(scanned > 1024 * 1024, "the scan read {scanned} bytes");
}

#[test]
fn the_bridge_takes_files_inline_under_the_same_rules() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt.block_on(start_tool_model(Arc::new(script)));
    let mut s = Serve::init("");
    let token = "bridge-files-token-41c";
    let file = s.secret_file("bridge.token", token);
    let port = tests::service::free_port();
    std::fs::write(
        s.state.join("config.toml"),
        format!(
            "[model]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"m\"\n\n\
             [sandbox]\nruntime = \"gvisor\"\n\n\
             [channels.bridge]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\n",
            model.base(),
            file.display()
        ),
    )
    .unwrap();
    s.start();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let post = |files: Value| {
        let (status, answer) = tests::service::bridge_post(
            port,
            token,
            &json!({ "chat": "fam", "text": "have a look", "files": files }),
        );
        assert_eq!(
            (status, answer["state"].as_str()),
            (202, Some("accepted")),
            "{answer}"
        );
    };
    // A Markdown note, read inside the box; an executable, refused with its notice.
    post(json!([{ "name": "list.md", "data": b64(b"# Plan\n- BRIDGE-DOC-77e") }]));
    post(json!([{ "name": "list.md", "data": b64(b"\x7fELF\x02\x01\x01\x00") }]));
    let mut texts: Vec<String> = Vec::new();
    let mut after = 0;
    for _ in 0..60 {
        let path = format!("/v1/replies?after={after}&wait=5");
        let (_, body) = tests::service::http(port, "GET", &path, Some(token), b"");
        let got: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        for r in got["replies"].as_array().into_iter().flatten() {
            after = after.max(r["id"].as_i64().unwrap_or(0));
            texts.extend(r["text"].as_str().map(str::to_owned));
        }
        if texts.len() >= 3 {
            break;
        }
    }
    assert!(
        texts
            .iter()
            .any(|t| t.contains("BRIDGE-DOC-77e") && t.contains("<document>")),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t == control_plane::files::notice::FILE_NOT_ACCEPTED),
        "{texts:?}"
    );
    assert!(
        texts.iter().filter(|t| t.starts_with(ECHO)).count() == 2,
        "{texts:?}"
    );
    // Not base64: refused at the door.
    let (status, _) = tests::service::bridge_post(
        port,
        token,
        &json!({ "chat": "fam", "text": "x", "files": [{ "name": "a", "data": "%%%" }] }),
    );
    assert_eq!(status, 400);
}
