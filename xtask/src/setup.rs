//! The Debian packages each xtask command needs, found missing and installed.
//!
//! Every command that builds or fetches something first asks `ensure` for
//! the system tools it needs. When some are missing, root installs them with
//! apt-get; anyone else gets the exact command to run and exit code 2, before
//! anything is built. A `Probe` looks at the machine (or, for tests and
//! `cargo xtask setup --sysroot DIR`, at a folder laid out like one).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// What a command is about to do; each purpose needs its own tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The host and the plugins (C code in ring and zstd), and the models from PyPI.
    Demo,
    /// The inference worker: llama.cpp through cmake, a C++ compiler and bindgen.
    Worker,
    /// Everything the test suite touches: the worker, the signing tools, llama.cpp's tools.
    Test,
}

impl Purpose {
    pub fn parse(s: &str) -> Option<Purpose> {
        match s {
            "demo" => Some(Purpose::Demo),
            "worker" => Some(Purpose::Worker),
            "test" => Some(Purpose::Test),
            _ => None,
        }
    }

    fn includes(self, other: Purpose) -> bool {
        self == other || self == Purpose::Test || (self == Purpose::Worker && other == Purpose::Demo)
    }
}

/// One tool, how to see that it is there, and the Debian package that brings it.
struct Need {
    what: &'static str,
    package: &'static str,
    check: Check,
    for_: Purpose,
}

enum Check {
    /// An executable of this name on the search path.
    Command(&'static str),
    /// `python3 -m pip` works.
    Pip,
    /// A libclang shared library where bindgen (clang-sys) looks for one.
    Libclang,
}

const NEEDS: &[Need] = &[
    Need { what: "a C compiler (ring, zstd)", package: "gcc", check: Check::Command("cc"), for_: Purpose::Demo },
    Need {
        what: "python3 (fetches the models)",
        package: "python3",
        check: Check::Command("python3"),
        for_: Purpose::Demo,
    },
    Need { what: "pip (models come from PyPI)", package: "python3-pip", check: Check::Pip, for_: Purpose::Demo },
    Need { what: "cmake (builds llama.cpp)", package: "cmake", check: Check::Command("cmake"), for_: Purpose::Worker },
    Need { what: "a C++ compiler (llama.cpp)", package: "g++", check: Check::Command("c++"), for_: Purpose::Worker },
    Need { what: "clang (bindgen's headers)", package: "clang", check: Check::Command("clang"), for_: Purpose::Worker },
    Need { what: "libclang (bindgen)", package: "libclang-dev", check: Check::Libclang, for_: Purpose::Worker },
    Need {
        what: "openssl (signing and bench)",
        package: "openssl",
        check: Check::Command("openssl"),
        for_: Purpose::Test,
    },
    Need { what: "gpg (signing tests)", package: "gnupg", check: Check::Command("gpg"), for_: Purpose::Test },
    Need {
        what: "gpg-agent (signing tests)",
        package: "gpg-agent",
        check: Check::Command("gpg-agent"),
        for_: Purpose::Test,
    },
    Need {
        what: "headless Chromium (web UI tests)",
        package: "chromium",
        check: Check::Command("chromium"),
        for_: Purpose::Test,
    },
    Need {
        what: "nats-server (scale-out tests)",
        package: "nats-server",
        check: Check::Command("nats-server"),
        for_: Purpose::Test,
    },
];

/// Where to look: the running machine, or a folder laid out like one.
pub struct Probe {
    sysroot: Option<PathBuf>,
}

impl Probe {
    pub fn machine() -> Probe {
        Probe { sysroot: None }
    }

    pub fn sysroot(dir: &Path) -> Probe {
        Probe { sysroot: Some(dir.to_path_buf()) }
    }

    fn under(&self, path: &str) -> PathBuf {
        match &self.sysroot {
            Some(root) => root.join(path.trim_start_matches('/')),
            None => PathBuf::from(path),
        }
    }

    /// PATH, then the sbin folders: Debian puts daemons such as nats-server in
    /// /usr/sbin, which a user's PATH often lacks.
    fn search_path(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = match &self.sysroot {
            Some(_) => ["/usr/local/bin", "/usr/bin", "/bin"].iter().map(|d| self.under(d)).collect(),
            None => std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default(),
        };
        dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].iter().map(|d| self.under(d)));
        dirs
    }

    fn has_command(&self, name: &str) -> bool {
        self.find_command(name).is_some()
    }

    fn find_command(&self, name: &str) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        self.search_path()
            .iter()
            .map(|d| d.join(name))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
    }

    fn has_pip(&self) -> bool {
        match &self.sysroot {
            // Debian's python3-pip puts the module here.
            Some(_) => self.under("/usr/lib/python3/dist-packages/pip").is_dir(),
            None => Command::new("python3")
                .args(["-m", "pip", "--version"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
        }
    }

    /// clang-sys honours LIBCLANG_PATH, then looks in LLVM's own folders and
    /// the multiarch library folder for `libclang.so`, `libclang-N.so` or a
    /// versioned `libclang.so.N`.
    fn has_libclang(&self) -> bool {
        let mut dirs = Vec::new();
        if self.sysroot.is_none()
            && let Some(p) = std::env::var_os("LIBCLANG_PATH")
        {
            dirs.push(PathBuf::from(p));
        }
        for base in ["/usr/lib", "/usr/lib64", "/usr/local/lib"] {
            let base = self.under(base);
            dirs.push(base.clone());
            for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("llvm") {
                    dirs.push(entry.path().join("lib"));
                } else if name.ends_with("-linux-gnu") {
                    dirs.push(entry.path());
                }
            }
        }
        dirs.iter().any(|d| {
            std::fs::read_dir(d).into_iter().flatten().flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("libclang")
                    && (n.ends_with(".so") || n.contains(".so."))
                    && !n.starts_with("libclang-cpp")
            })
        })
    }

    fn satisfied(&self, check: &Check) -> bool {
        match check {
            Check::Command(name) => self.has_command(name),
            Check::Pip => self.has_pip(),
            Check::Libclang => self.has_libclang(),
        }
    }
}

/// What is missing for `purpose`: (what, package) pairs, each package once.
pub fn missing(probe: &Probe, purpose: Purpose) -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for need in NEEDS.iter().filter(|n| purpose.includes(n.for_)) {
        if !probe.satisfied(&need.check) && !out.iter().any(|(_, p)| *p == need.package) {
            out.push((need.what, need.package));
        }
    }
    out
}

/// The one-line command that installs `packages`.
pub fn install_command(packages: &[&str], as_root: bool) -> String {
    let sudo = if as_root { "" } else { "sudo " };
    format!("{sudo}apt-get update && {sudo}apt-get install -y --no-install-recommends {}", packages.join(" "))
}

/// The error for a user who must install packages themselves: xtask exits 2 on it.
#[derive(Debug)]
pub struct NeedsRoot(pub String);

impl std::fmt::Display for NeedsRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NeedsRoot {}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Installs with apt-get, as root only; anyone else gets `NeedsRoot` with the command.
pub fn apt_install(packages: &[&str], why: &str) -> Result<()> {
    apt_install_as(packages, why, is_root())
}

fn apt_install_as(packages: &[&str], why: &str, root: bool) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !root {
        return Err(NeedsRoot(format!(
            "{why} needs Debian packages that are not installed: {}\nrun this, then the same cargo xtask command again:\n  {}",
            packages.join(" "),
            install_command(packages, false)
        ))
        .into());
    }
    println!("xtask: installing {} for {why}", packages.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get (this machine is not Debian-like?)")?;
        if !status.success() {
            bail!("apt-get {} failed with {status}", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt(&args)
}

/// Makes sure `purpose` has its tools, installing what is missing (or refusing, see `apt_install`).
pub fn ensure(purpose: Purpose) -> Result<()> {
    let probe = Probe::machine();
    let gaps = missing(&probe, purpose);
    if gaps.is_empty() {
        return Ok(());
    }
    for (what, package) in &gaps {
        println!("xtask: missing {what}: Debian package {package}");
    }
    let packages: Vec<&str> = gaps.iter().map(|(_, p)| *p).collect();
    apt_install(&packages, &format!("cargo xtask ({purpose:?})").to_lowercase())?;
    let still = missing(&probe, purpose);
    if !still.is_empty() {
        bail!(
            "after installing, still missing: {}",
            still.iter().map(|(w, p)| format!("{w} ({p})")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// `cargo xtask setup [--for demo|worker|test] [--dry-run] [--sysroot DIR]`.
pub fn command(args: &[String]) -> Result<()> {
    let mut purpose = Purpose::Test;
    let mut dry_run = false;
    let mut sysroot = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dry-run" => dry_run = true,
            "--for" => {
                let v = it.next().context("--for needs demo, worker or test")?;
                purpose = Purpose::parse(v).with_context(|| format!("--for {v}: expected demo, worker or test"))?;
            }
            "--sysroot" => sysroot = Some(PathBuf::from(it.next().context("--sysroot needs a folder")?)),
            other => bail!("setup: unknown argument {other}"),
        }
    }
    if sysroot.is_some() && !dry_run {
        bail!("--sysroot only describes another machine: use it with --dry-run");
    }
    if !dry_run {
        return ensure(purpose);
    }
    let probe = sysroot.as_deref().map_or_else(Probe::machine, Probe::sysroot);
    let gaps = missing(&probe, purpose);
    let name = format!("{purpose:?}").to_lowercase();
    if gaps.is_empty() {
        println!("setup ({name}): nothing to install");
        return Ok(());
    }
    for (what, package) in &gaps {
        println!("setup ({name}): missing {what}: {package}");
    }
    let packages: Vec<&str> = gaps.iter().map(|(_, p)| *p).collect();
    println!("setup ({name}): would run: {}", install_command(&packages, is_root()));
    Ok(())
}

/// Where a command is on this machine's PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    Probe::machine().find_command(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A folder laid out like a machine that has `commands` in /usr/bin.
    fn fake_machine(name: &str, commands: &[&str]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("xtask-setup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let bin = root.join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        for c in commands {
            let p = bin.join(c);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::create_dir_all(root.join("usr/lib/python3/dist-packages/pip")).unwrap();
        root
    }

    fn packages(probe: &Probe, purpose: Purpose) -> Vec<&'static str> {
        missing(probe, purpose).into_iter().map(|(_, p)| p).collect()
    }

    const ALL: &[&str] =
        &["cc", "python3", "cmake", "c++", "clang", "openssl", "gpg", "gpg-agent", "chromium", "nats-server"];

    #[test]
    fn a_machine_without_libclang_needs_only_libclang_dev_for_the_tests() {
        let root = fake_machine("no-libclang", ALL);
        let probe = Probe::sysroot(&root);
        assert_eq!(packages(&probe, Purpose::Test), ["libclang-dev"]);
        assert_eq!(packages(&probe, Purpose::Worker), ["libclang-dev"]);
        // The demo never builds the worker, so it needs nothing here.
        assert!(packages(&probe, Purpose::Demo).is_empty());
        // Debian's libclang1 puts a versioned library in the multiarch folder: that is enough.
        let lib = root.join("usr/lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libclang-14.so.1"), b"").unwrap();
        assert!(packages(&probe, Purpose::Test).is_empty());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn libclang_cpp_is_not_libclang() {
        let root = fake_machine("clang-cpp", ALL);
        let lib = root.join("usr/lib/llvm-14/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libclang-cpp.so.14"), b"").unwrap();
        assert_eq!(packages(&Probe::sysroot(&root), Purpose::Worker), ["libclang-dev"]);
        std::fs::write(lib.join("libclang.so"), b"").unwrap();
        assert!(packages(&Probe::sysroot(&root), Purpose::Worker).is_empty());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn an_empty_machine_needs_everything_once_and_the_demo_a_subset() {
        let root = fake_machine("empty", &[]);
        std::fs::remove_dir_all(root.join("usr/lib/python3")).unwrap();
        let probe = Probe::sysroot(&root);
        let test = packages(&probe, Purpose::Test);
        assert_eq!(
            test,
            [
                "gcc",
                "python3",
                "python3-pip",
                "cmake",
                "g++",
                "clang",
                "libclang-dev",
                "openssl",
                "gnupg",
                "gpg-agent",
                "chromium",
                "nats-server"
            ]
        );
        assert_eq!(packages(&probe, Purpose::Demo), ["gcc", "python3", "python3-pip"]);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_file_that_is_not_executable_is_not_a_command() {
        let root = fake_machine("not-exec", ALL);
        std::fs::set_permissions(root.join("usr/bin/cmake"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::create_dir_all(root.join("usr/lib/llvm-14/lib")).unwrap();
        std::fs::write(root.join("usr/lib/llvm-14/lib/libclang.so"), b"").unwrap();
        assert_eq!(packages(&Probe::sysroot(&root), Purpose::Test), ["cmake"]);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_user_who_is_not_root_is_refused_with_the_command_to_run() {
        let err = apt_install_as(&["cmake", "libclang-dev"], "cargo xtask (test)", false).unwrap_err();
        let needs = err.downcast_ref::<NeedsRoot>().expect("a NeedsRoot error, which xtask turns into exit 2");
        assert!(needs.0.contains("cmake libclang-dev"), "{needs}");
        assert!(
            needs
                .0
                .ends_with("sudo apt-get update && sudo apt-get install -y --no-install-recommends cmake libclang-dev"),
            "{needs}"
        );
        // Nothing missing: nothing to refuse, even for a user.
        assert!(apt_install_as(&[], "cargo xtask (demo)", false).is_ok());
    }

    #[test]
    fn the_command_a_user_is_told_to_run_uses_sudo() {
        assert_eq!(
            install_command(&["cmake", "libclang-dev"], false),
            "sudo apt-get update && sudo apt-get install -y --no-install-recommends cmake libclang-dev"
        );
        assert_eq!(
            install_command(&["cmake"], true),
            "apt-get update && apt-get install -y --no-install-recommends cmake"
        );
    }
}
