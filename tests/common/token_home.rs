//! A test home with a SoftHSM token of its own (own token directory and `softhsm2.conf`),
//! configured as `[pkcs11.tok]`, for tests that drive the real `keyward` binary and agent.

use std::fs;
use std::path::PathBuf;

use super::{run_command, write_private, Agent, Output, TestHome};

pub const SO_PIN: &str = "so-pin-4821";
pub const USER_PIN: &str = "user-pin-7310";
const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

pub struct TokenHome {
    pub home: TestHome,
    pub conf: PathBuf,
    pub pin_file: PathBuf,
    pub label: String,
}

impl TokenHome {
    /// Home + token `label` (initialised through `keyward token init`), as `[pkcs11.tok]`.
    pub fn new(label: &str) -> TokenHome {
        let home = TestHome::new();
        let tokens = home.path("tokens");
        fs::create_dir(&tokens).expect("token dir");
        let conf = home.path("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("softhsm conf");
        let so = home.path("so-pin");
        let pin_file = home.path("user-pin");
        write_private(&so, SO_PIN.as_bytes());
        write_private(&pin_file, USER_PIN.as_bytes());
        let h = TokenHome {
            home,
            conf,
            pin_file,
            label: label.to_string(),
        };
        h.ok(&[
            "token",
            "init",
            "--label",
            label,
            "--so-pin",
            &format!("file:{}", so.display()),
            "--pin",
            &format!("file:{}", h.pin_file.display()),
        ]);
        h.set_token_config(&format!("label = \"{label}\""));
        h
    }

    /// The environment every command and agent of this home needs.
    pub fn env(&self) -> [(&'static str, String); 1] {
        [("SOFTHSM2_CONF", self.conf.display().to_string())]
    }

    /// Replace keyward.toml with a `[pkcs11.tok]` section of `body` (empty: no section).
    pub fn set_token_config(&self, body: &str) {
        let path = self.home.home.join("keyward.toml");
        let mut text = if body.is_empty() {
            String::new()
        } else {
            format!(
                "[pkcs11.tok]\n{body}\npin = \"file:{}\"\n",
                self.pin_file.display()
            )
        };
        if !body.contains("module") && !body.is_empty() {
            text.push_str(&format!("module = \"{MODULE}\"\n"));
        }
        write_private(&path, text.as_bytes());
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let env = self.env();
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.home.run_full(args, None, &e)
    }

    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(out.success(), "command failed:\n{out}");
        out
    }

    pub fn generate(&self, name: &str, key_type: &str) {
        self.ok(&[
            "key",
            "generate",
            name,
            "--type",
            key_type,
            "--backend",
            "pkcs11",
            "--token",
            "tok",
        ]);
    }

    pub fn import(&self, name: &str, key_type: &str, secret: &[u8]) {
        let src = self.home.path(&format!("import-{name}"));
        write_private(&src, secret);
        self.ok(&[
            "key",
            "import",
            name,
            "--type",
            key_type,
            "--backend",
            "pkcs11",
            "--token",
            "tok",
            "--file",
            &src.display().to_string(),
        ]);
    }

    pub fn agent(&self) -> Agent {
        let env = self.env();
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.home.agent_with_env(&e)
    }

    /// `pkcs11-tool` on this token, logged in.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Output {
        let mut c = std::process::Command::new("pkcs11-tool");
        c.env("SOFTHSM2_CONF", &self.conf).args([
            "--module",
            MODULE,
            "--token-label",
            &self.label,
            "--login",
            "--pin",
            USER_PIN,
        ]);
        c.args(args);
        run_command(c, None)
    }
}
