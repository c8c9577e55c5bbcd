//! Loading and adopting. `Datapath::load` is what moatd runs at start: it verifies any state
//! already pinned (refusing another layout), loads the object so that aya reuses the pinned
//! maps (nothing is flushed), pins fresh programs, and moves every pinned endpoint link onto
//! them with an atomic link update. Enforcement therefore never pauses across a restart or an
//! upgrade: the old programs keep running until the update swaps them.

use std::{fs, io, path::Path};

use anyhow::Context;
use aya::{
    EbpfLoader,
    maps::{Array, MapData},
    programs::{
        SchedClassifier, SocketFilter, links::FdLink, links::PinnedLink, tc::SchedClassifierLink,
    },
};
use moat_common::{LAYOUT_VERSION, Meta, map_name, program_name};
use tracing::{debug, info};

use crate::{EBPF_OBJECT, Error, MapSizes, PinDir, Result, layout, resize::Resizing};

pub struct Datapath {
    ebpf: aya::Ebpf,
    pins: PinDir,
    /// True when pinned maps from an earlier run were found and reused.
    pub adopted: bool,
    /// Endpoint attachments (pinned TCX links and tc filters) moved onto the freshly loaded
    /// programs.
    pub links_updated: usize,
    /// How many instructions the kernel's verifier walked for each program (0 where the
    /// kernel does not say): the load's cost, and the headroom left under its 1,000,000
    /// budget. `moat-bench verifier` reports them.
    pub verified: Vec<(&'static str, u32)>,
}

impl Datapath {
    /// Loads with every map at its default size.
    pub fn load(pins: &PinDir) -> Result<Self> {
        Self::load_sized(pins, &MapSizes::default())
    }

    /// Loads with the sized maps at `sizes`; a pinned map of another size is resized (its
    /// entries carried over, see `resize`).
    pub fn load_sized(pins: &PinDir, sizes: &MapSizes) -> Result<Self> {
        for dir in [pins.maps(), pins.programs(), pins.links()] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let existing = layout::check_all(pins, sizes)?;
        check_meta(pins)?;
        // Put back by its Drop if anything below fails before `finish`.
        let resizing = Resizing::set_aside(pins, &existing.resize)?;
        // The programs tc filters may run from an earlier start: moved onto the new ones below.
        let previous: Vec<u32> = pinned_programs(pins).iter().map(|p| p.id).collect();

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps());
        for (map, entries) in sizes.per_map() {
            loader.map_max_entries(map, entries);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the Moat eBPF object")?;
        resizing.carry_over()?;

        let mut verified = Vec::with_capacity(3);
        for name in [program_name::FROM_CONTAINER, program_name::TO_CONTAINER] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a classifier"))?;
            program
                .load()
                .with_context(|| format!("kernel verifier rejected {name}"))?;
            verified.push((name, verified_instructions(program.info())));
            replace_pin(program, &pins.program(name))?;
        }
        // Not attached by Moat: netfilter runs it from the pinned path (moatd's after-DNAT
        // rules), so a rule made after this pin refers to this program.
        let after_dnat: &mut SocketFilter = ebpf
            .program_mut(program_name::AFTER_DNAT)
            .with_context(|| {
                format!(
                    "program {} missing from the object",
                    program_name::AFTER_DNAT
                )
            })?
            .try_into()
            .with_context(|| {
                format!(
                    "program {} is not a socket filter",
                    program_name::AFTER_DNAT
                )
            })?;
        after_dnat
            .load()
            .with_context(|| format!("kernel verifier rejected {}", program_name::AFTER_DNAT))?;
        verified.push((
            program_name::AFTER_DNAT,
            verified_instructions(after_dnat.info()),
        ));
        replace_pin(after_dnat, &pins.program(program_name::AFTER_DNAT))?;

        let mut dp = Self {
            ebpf,
            pins: pins.clone(),
            adopted: existing.count > 0,
            links_updated: 0,
            verified,
        };
        dp.links_updated = dp.update_pinned_links()?;
        dp.links_updated += crate::tc::replace_programs(&mut dp.ebpf, &previous)?;
        dp.write_meta()?;
        resizing.finish();
        info!(
            pin_dir = %pins.base().display(),
            adopted = dp.adopted,
            links_updated = dp.links_updated,
            verified_instructions = ?dp.verified,
            "datapath loaded"
        );
        Ok(dp)
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// Moves every pinned endpoint link onto this process's programs (bpf_link_update).
    fn update_pinned_links(&mut self) -> Result<usize> {
        let mut updated = 0;
        let entries = match fs::read_dir(self.pins.links()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context("reading pinned links")
                    .into());
            }
        };
        for entry in entries {
            let path = entry.context("reading pinned links")?.path();
            let Some((hook, _ifname)) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(PinDir::parse_link_name)
            else {
                continue;
            };
            let name = match hook {
                crate::attach::HOOK_FROM_CONTAINER => program_name::FROM_CONTAINER,
                crate::attach::HOOK_TO_CONTAINER => program_name::TO_CONTAINER,
                _ => continue,
            };
            let pinned = match PinnedLink::from_pin(&path) {
                Ok(link) => link,
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "skipping unreadable link pin");
                    continue;
                }
            };
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .with_context(|| format!("pinned link {} is not a TC link", path.display()))?;
            let program: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .context("program missing")?
                .try_into()
                .context("program type")?;
            let id = program
                .attach_to_link(link)
                .with_context(|| format!("updating pinned link {}", path.display()))?;
            // The pin keeps the link alive; this process's handle can go.
            drop(program.take_link(id).context("releasing link handle")?);
            updated += 1;
        }
        Ok(updated)
    }

    fn write_meta(&mut self) -> Result<()> {
        let mut meta: Array<&mut MapData, Meta> = Array::try_from(
            self.ebpf
                .map_mut(map_name::META)
                .context("META map missing from the object")?,
        )
        .context("META map type")?;
        meta.set(
            0,
            Meta {
                layout_version: LAYOUT_VERSION,
                _pad: 0,
            },
            0,
        )
        .map_err(|source| Error::Map {
            context: "writing layout version".into(),
            source,
        })?;
        Ok(())
    }
}

/// A pinned META that names another layout is refused even if the sizes happen to match.
fn check_meta(pins: &PinDir) -> Result<()> {
    let path = pins.map(map_name::META);
    if !path.exists() {
        return Ok(());
    }
    let data = MapData::from_pin(&path).map_err(|e| Error::IncompatibleLayout {
        path: path.display().to_string(),
        detail: format!("cannot open: {e}"),
    })?;
    let meta: Array<MapData, Meta> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(|e| Error::IncompatibleLayout {
            path: path.display().to_string(),
            detail: format!("not an array: {e}"),
        })?;
    let value = meta.get(&0, 0).map_err(|e| Error::IncompatibleLayout {
        path: path.display().to_string(),
        detail: format!("cannot read: {e}"),
    })?;
    // 0 = created by a loader that died before writing it: same object, safe to adopt.
    if value.layout_version != 0 && value.layout_version != LAYOUT_VERSION {
        return Err(Error::IncompatibleLayout {
            path: path.display().to_string(),
            detail: format!(
                "layout version {}, this build uses {LAYOUT_VERSION}",
                value.layout_version
            ),
        });
    }
    Ok(())
}

/// Pins the program at `path`, replacing an older pin without a moment where none exists.
fn replace_pin(program: &mut impl PinProgram, path: &Path) -> Result<()> {
    let tmp = path.with_file_name(format!(
        "{}-new",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("program")
    ));
    let _ = fs::remove_file(&tmp);
    program
        .pin_at(&tmp)
        .with_context(|| format!("pinning program at {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming pin to {}", path.display()))?;
    Ok(())
}

/// The program types Moat pins (aya gives each its own `pin`).
trait PinProgram {
    fn pin_at(&mut self, path: &Path) -> std::result::Result<(), aya::pin::PinError>;
}

impl PinProgram for SchedClassifier {
    fn pin_at(&mut self, path: &Path) -> std::result::Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

impl PinProgram for SocketFilter {
    fn pin_at(&mut self, path: &Path) -> std::result::Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

/// A pinned program as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedProgram {
    pub name: &'static str,
    pub id: u32,
    pub tag: u64,
    /// When the kernel loaded it.
    pub loaded_at: Option<std::time::SystemTime>,
}

/// The installation's pinned programs (those found).
pub fn pinned_programs(pins: &PinDir) -> Vec<PinnedProgram> {
    [program_name::FROM_CONTAINER, program_name::TO_CONTAINER]
        .into_iter()
        .filter_map(|name| {
            let info = aya::programs::ProgramInfo::from_pin(pins.program(name)).ok()?;
            Some(PinnedProgram {
                name,
                id: info.id(),
                tag: info.tag(),
                loaded_at: info.loaded_at(),
            })
        })
        .collect()
}

/// The verifier's instruction count for a loaded program (`bpf_prog_info.verified_insns`,
/// kernel 5.16 and later), 0 when unknown.
fn verified_instructions(
    info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>,
) -> u32 {
    info.ok()
        .and_then(|info| info.verified_instruction_count())
        .unwrap_or(0)
}
