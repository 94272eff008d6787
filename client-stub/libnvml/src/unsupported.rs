//! NVML entry points that gpupool does not implement. Each is exported (a
//! program linked against libnvidia-ml finds every symbol, and tools that
//! look functions up one by one find them too); a call returns
//! `NVML_ERROR_NOT_SUPPORTED` and logs the name once (at `info`: see
//! `crate::abi::log_unsupported`). Monitoring tools show such a value as
//! "N/A", which is the truth: the client cannot see the GPU's clocks,
//! temperature, power or ECC counters, and cannot change its settings.
//!
//! The stubs take no parameters: under the C calling conventions of the
//! platforms gpupool ships for (x86-64 and AArch64 System V), the caller
//! passes the arguments in registers or on its own stack and cleans them
//! up, so a callee that ignores them is safe whatever the real signature.
//! Every one of these functions returns `nvmlReturn_t` (`nvmlErrorString`,
//! the one NVML function that does not, is implemented).
//!
//! The list is every function of nvml-wrapper-sys's bindings (NVML 12,
//! legacy versions included) minus what [`crate::system`] and
//! [`crate::device`] export. It is generated: `GPUPOOL_WRITE_SYMBOLS=1 cargo
//! test -p gpupool-libnvml symbol_lists` rewrites it, and the same test
//! fails when it is out of date.

use nvml_wrapper_sys::bindings::nvmlReturn_t;

macro_rules! unsupported {
    ($($name:ident)*) => {
        $(
            #[unsafe(no_mangle)]
            pub extern "C" fn $name() -> nvmlReturn_t {
                crate::abi::unsupported(stringify!($name))
            }
        )*
        /// The stubs' names, for tests.
        #[cfg(test)]
        pub(crate) const NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

unsupported! {
    nvmlComputeInstanceDestroy
    nvmlComputeInstanceGetInfo
    nvmlComputeInstanceGetInfo_v2
    nvmlDeviceClearAccountingPids
    nvmlDeviceClearCpuAffinity
    nvmlDeviceClearEccErrorCounts
    nvmlDeviceClearFieldValues
    nvmlDeviceCreateGpuInstance
    nvmlDeviceCreateGpuInstanceWithPlacement
    nvmlDeviceDiscoverGpus
    nvmlDeviceFreezeNvLinkUtilizationCounter
    nvmlDeviceGetAPIRestriction
    nvmlDeviceGetAccountingBufferSize
    nvmlDeviceGetAccountingMode
    nvmlDeviceGetAccountingPids
    nvmlDeviceGetAccountingStats
    nvmlDeviceGetActiveVgpus
    nvmlDeviceGetAdaptiveClockInfoStatus
    nvmlDeviceGetAddressingMode
    nvmlDeviceGetApplicationsClock
    nvmlDeviceGetAttributes
    nvmlDeviceGetAttributes_v2
    nvmlDeviceGetAutoBoostedClocksEnabled
    nvmlDeviceGetBAR1MemoryInfo
    nvmlDeviceGetBoardId
    nvmlDeviceGetBoardPartNumber
    nvmlDeviceGetBridgeChipInfo
    nvmlDeviceGetBusType
    nvmlDeviceGetC2cModeInfoV
    nvmlDeviceGetCapabilities
    nvmlDeviceGetClkMonStatus
    nvmlDeviceGetClock
    nvmlDeviceGetClockInfo
    nvmlDeviceGetClockOffsets
    nvmlDeviceGetComputeInstanceId
    nvmlDeviceGetConfComputeGpuAttestationReport
    nvmlDeviceGetConfComputeGpuCertificate
    nvmlDeviceGetConfComputeMemSizeInfo
    nvmlDeviceGetConfComputeProtectedMemoryUsage
    nvmlDeviceGetCoolerInfo
    nvmlDeviceGetCpuAffinity
    nvmlDeviceGetCpuAffinityWithinScope
    nvmlDeviceGetCreatableVgpus
    nvmlDeviceGetCurrentClockFreqs
    nvmlDeviceGetCurrentClocksEventReasons
    nvmlDeviceGetCurrentClocksThrottleReasons
    nvmlDeviceGetDecoderUtilization
    nvmlDeviceGetDefaultApplicationsClock
    nvmlDeviceGetDefaultEccMode
    nvmlDeviceGetDetailedEccErrors
    nvmlDeviceGetDeviceHandleFromMigDeviceHandle
    nvmlDeviceGetDisplayActive
    nvmlDeviceGetDisplayMode
    nvmlDeviceGetDramEncryptionMode
    nvmlDeviceGetDriverModel
    nvmlDeviceGetDriverModel_v2
    nvmlDeviceGetDynamicPstatesInfo
    nvmlDeviceGetEccMode
    nvmlDeviceGetEncoderCapacity
    nvmlDeviceGetEncoderSessions
    nvmlDeviceGetEncoderStats
    nvmlDeviceGetEncoderUtilization
    nvmlDeviceGetEnforcedPowerLimit
    nvmlDeviceGetFBCSessions
    nvmlDeviceGetFBCStats
    nvmlDeviceGetFanControlPolicy_v2
    nvmlDeviceGetFanSpeed
    nvmlDeviceGetFanSpeedRPM
    nvmlDeviceGetFanSpeed_v2
    nvmlDeviceGetGpcClkMinMaxVfOffset
    nvmlDeviceGetGpcClkVfOffset
    nvmlDeviceGetGpuInstanceById
    nvmlDeviceGetGpuInstanceId
    nvmlDeviceGetGpuInstancePossiblePlacements
    nvmlDeviceGetGpuInstancePossiblePlacements_v2
    nvmlDeviceGetGpuInstanceProfileInfo
    nvmlDeviceGetGpuInstanceProfileInfoByIdV
    nvmlDeviceGetGpuInstanceProfileInfoV
    nvmlDeviceGetGpuInstanceRemainingCapacity
    nvmlDeviceGetGpuInstances
    nvmlDeviceGetGpuMaxPcieLinkGeneration
    nvmlDeviceGetGpuOperationMode
    nvmlDeviceGetGridLicensableFeatures
    nvmlDeviceGetGridLicensableFeatures_v2
    nvmlDeviceGetGridLicensableFeatures_v3
    nvmlDeviceGetGridLicensableFeatures_v4
    nvmlDeviceGetGspFirmwareMode
    nvmlDeviceGetGspFirmwareVersion
    nvmlDeviceGetHandleBySerial
    nvmlDeviceGetHandleByUUIDV
    nvmlDeviceGetHostVgpuMode
    nvmlDeviceGetInforomConfigurationChecksum
    nvmlDeviceGetInforomImageVersion
    nvmlDeviceGetInforomVersion
    nvmlDeviceGetIrqNum
    nvmlDeviceGetJpgUtilization
    nvmlDeviceGetLastBBXFlushTime
    nvmlDeviceGetMarginTemperature
    nvmlDeviceGetMaxClockInfo
    nvmlDeviceGetMaxCustomerBoostClock
    nvmlDeviceGetMaxMigDeviceCount
    nvmlDeviceGetMemClkMinMaxVfOffset
    nvmlDeviceGetMemClkVfOffset
    nvmlDeviceGetMemoryAffinity
    nvmlDeviceGetMemoryBusWidth
    nvmlDeviceGetMemoryErrorCounter
    nvmlDeviceGetMigDeviceHandleByIndex
    nvmlDeviceGetMinMaxClockOfPState
    nvmlDeviceGetMinMaxFanSpeed
    nvmlDeviceGetModuleId
    nvmlDeviceGetNumFans
    nvmlDeviceGetNumaNodeId
    nvmlDeviceGetNvLinkCapability
    nvmlDeviceGetNvLinkErrorCounter
    nvmlDeviceGetNvLinkInfo
    nvmlDeviceGetNvLinkRemoteDeviceType
    nvmlDeviceGetNvLinkRemotePciInfo
    nvmlDeviceGetNvLinkRemotePciInfo_v2
    nvmlDeviceGetNvLinkState
    nvmlDeviceGetNvLinkUtilizationControl
    nvmlDeviceGetNvLinkUtilizationCounter
    nvmlDeviceGetNvLinkVersion
    nvmlDeviceGetNvlinkBwMode
    nvmlDeviceGetNvlinkSupportedBwModes
    nvmlDeviceGetOfaUtilization
    nvmlDeviceGetP2PStatus
    nvmlDeviceGetPciInfo
    nvmlDeviceGetPciInfoExt
    nvmlDeviceGetPciInfo_v2
    nvmlDeviceGetPcieReplayCounter
    nvmlDeviceGetPcieThroughput
    nvmlDeviceGetPdi
    nvmlDeviceGetPerformanceModes
    nvmlDeviceGetPerformanceState
    nvmlDeviceGetPgpuMetadataString
    nvmlDeviceGetPlatformInfo
    nvmlDeviceGetPowerManagementDefaultLimit
    nvmlDeviceGetPowerManagementLimit
    nvmlDeviceGetPowerManagementLimitConstraints
    nvmlDeviceGetPowerManagementMode
    nvmlDeviceGetPowerMizerMode_v1
    nvmlDeviceGetPowerSource
    nvmlDeviceGetPowerState
    nvmlDeviceGetPowerUsage
    nvmlDeviceGetProcessUtilization
    nvmlDeviceGetProcessesUtilizationInfo
    nvmlDeviceGetRemappedRows
    nvmlDeviceGetRepairStatus
    nvmlDeviceGetRetiredPages
    nvmlDeviceGetRetiredPagesPendingStatus
    nvmlDeviceGetRetiredPages_v2
    nvmlDeviceGetRowRemapperHistogram
    nvmlDeviceGetRunningProcessDetailList
    nvmlDeviceGetSamples
    nvmlDeviceGetSerial
    nvmlDeviceGetSramEccErrorStatus
    nvmlDeviceGetSramUniqueUncorrectedEccErrorCounts
    nvmlDeviceGetSupportedClocksEventReasons
    nvmlDeviceGetSupportedClocksThrottleReasons
    nvmlDeviceGetSupportedEventTypes
    nvmlDeviceGetSupportedGraphicsClocks
    nvmlDeviceGetSupportedMemoryClocks
    nvmlDeviceGetSupportedPerformanceStates
    nvmlDeviceGetSupportedVgpus
    nvmlDeviceGetTargetFanSpeed
    nvmlDeviceGetTemperature
    nvmlDeviceGetTemperatureThreshold
    nvmlDeviceGetTemperatureV
    nvmlDeviceGetThermalSettings
    nvmlDeviceGetTopologyCommonAncestor
    nvmlDeviceGetTopologyNearestGpus
    nvmlDeviceGetTotalEccErrors
    nvmlDeviceGetTotalEnergyConsumption
    nvmlDeviceGetVbiosVersion
    nvmlDeviceGetVgpuCapabilities
    nvmlDeviceGetVgpuHeterogeneousMode
    nvmlDeviceGetVgpuInstancesUtilizationInfo
    nvmlDeviceGetVgpuMetadata
    nvmlDeviceGetVgpuProcessUtilization
    nvmlDeviceGetVgpuProcessesUtilizationInfo
    nvmlDeviceGetVgpuSchedulerCapabilities
    nvmlDeviceGetVgpuSchedulerLog
    nvmlDeviceGetVgpuSchedulerState
    nvmlDeviceGetVgpuTypeCreatablePlacements
    nvmlDeviceGetVgpuTypeSupportedPlacements
    nvmlDeviceGetVgpuUtilization
    nvmlDeviceGetViolationStatus
    nvmlDeviceGetVirtualizationMode
    nvmlDeviceModifyDrainState
    nvmlDeviceOnSameBoard
    nvmlDevicePowerSmoothingActivatePresetProfile
    nvmlDevicePowerSmoothingSetState
    nvmlDevicePowerSmoothingUpdatePresetProfileParam
    nvmlDeviceQueryDrainState
    nvmlDeviceReadWritePRM_v1
    nvmlDeviceRegisterEvents
    nvmlDeviceRemoveGpu
    nvmlDeviceRemoveGpu_v2
    nvmlDeviceResetApplicationsClocks
    nvmlDeviceResetGpuLockedClocks
    nvmlDeviceResetMemoryLockedClocks
    nvmlDeviceResetNvLinkErrorCounters
    nvmlDeviceResetNvLinkUtilizationCounter
    nvmlDeviceSetAPIRestriction
    nvmlDeviceSetAccountingMode
    nvmlDeviceSetApplicationsClocks
    nvmlDeviceSetAutoBoostedClocksEnabled
    nvmlDeviceSetClockOffsets
    nvmlDeviceSetComputeMode
    nvmlDeviceSetConfComputeUnprotectedMemSize
    nvmlDeviceSetCpuAffinity
    nvmlDeviceSetDefaultAutoBoostedClocksEnabled
    nvmlDeviceSetDefaultFanSpeed_v2
    nvmlDeviceSetDramEncryptionMode
    nvmlDeviceSetDriverModel
    nvmlDeviceSetEccMode
    nvmlDeviceSetFanControlPolicy
    nvmlDeviceSetFanSpeed_v2
    nvmlDeviceSetGpcClkVfOffset
    nvmlDeviceSetGpuLockedClocks
    nvmlDeviceSetGpuOperationMode
    nvmlDeviceSetMemClkVfOffset
    nvmlDeviceSetMemoryLockedClocks
    nvmlDeviceSetMigMode
    nvmlDeviceSetNvLinkDeviceLowPowerThreshold
    nvmlDeviceSetNvLinkUtilizationControl
    nvmlDeviceSetNvlinkBwMode
    nvmlDeviceSetPersistenceMode
    nvmlDeviceSetPowerManagementLimit
    nvmlDeviceSetPowerManagementLimit_v2
    nvmlDeviceSetPowerMizerMode_v1
    nvmlDeviceSetTemperatureThreshold
    nvmlDeviceSetVgpuCapabilities
    nvmlDeviceSetVgpuHeterogeneousMode
    nvmlDeviceSetVgpuSchedulerState
    nvmlDeviceSetVirtualizationMode
    nvmlDeviceValidateInforom
    nvmlDeviceWorkloadPowerProfileClearRequestedProfiles
    nvmlDeviceWorkloadPowerProfileGetCurrentProfiles
    nvmlDeviceWorkloadPowerProfileGetProfilesInfo
    nvmlDeviceWorkloadPowerProfileSetRequestedProfiles
    nvmlEventSetCreate
    nvmlEventSetFree
    nvmlEventSetWait
    nvmlEventSetWait_v2
    nvmlGetExcludedDeviceCount
    nvmlGetExcludedDeviceInfoByIndex
    nvmlGetVgpuCompatibility
    nvmlGetVgpuDriverCapabilities
    nvmlGetVgpuVersion
    nvmlGpmMetricsGet
    nvmlGpmMigSampleGet
    nvmlGpmQueryDeviceSupport
    nvmlGpmQueryIfStreamingEnabled
    nvmlGpmSampleAlloc
    nvmlGpmSampleFree
    nvmlGpmSampleGet
    nvmlGpmSetStreamingEnabled
    nvmlGpuInstanceCreateComputeInstance
    nvmlGpuInstanceCreateComputeInstanceWithPlacement
    nvmlGpuInstanceDestroy
    nvmlGpuInstanceGetActiveVgpus
    nvmlGpuInstanceGetComputeInstanceById
    nvmlGpuInstanceGetComputeInstancePossiblePlacements
    nvmlGpuInstanceGetComputeInstanceProfileInfo
    nvmlGpuInstanceGetComputeInstanceProfileInfoV
    nvmlGpuInstanceGetComputeInstanceRemainingCapacity
    nvmlGpuInstanceGetComputeInstances
    nvmlGpuInstanceGetCreatableVgpus
    nvmlGpuInstanceGetInfo
    nvmlGpuInstanceGetVgpuHeterogeneousMode
    nvmlGpuInstanceGetVgpuSchedulerLog
    nvmlGpuInstanceGetVgpuSchedulerState
    nvmlGpuInstanceGetVgpuTypeCreatablePlacements
    nvmlGpuInstanceSetVgpuHeterogeneousMode
    nvmlGpuInstanceSetVgpuSchedulerState
    nvmlSetVgpuVersion
    nvmlSystemEventSetCreate
    nvmlSystemEventSetFree
    nvmlSystemEventSetWait
    nvmlSystemGetConfComputeCapabilities
    nvmlSystemGetConfComputeGpusReadyState
    nvmlSystemGetConfComputeKeyRotationThresholdInfo
    nvmlSystemGetConfComputeSettings
    nvmlSystemGetConfComputeState
    nvmlSystemGetDriverBranch
    nvmlSystemGetHicVersion
    nvmlSystemGetNvlinkBwMode
    nvmlSystemGetProcessName
    nvmlSystemGetTopologyGpuSet
    nvmlSystemRegisterEvents
    nvmlSystemSetConfComputeGpusReadyState
    nvmlSystemSetConfComputeKeyRotationThresholdInfo
    nvmlSystemSetNvlinkBwMode
    nvmlUnitGetCount
    nvmlUnitGetDevices
    nvmlUnitGetFanSpeedInfo
    nvmlUnitGetHandleByIndex
    nvmlUnitGetLedState
    nvmlUnitGetPsuInfo
    nvmlUnitGetTemperature
    nvmlUnitGetUnitInfo
    nvmlUnitSetLedState
    nvmlVgpuInstanceClearAccountingPids
    nvmlVgpuInstanceGetAccountingMode
    nvmlVgpuInstanceGetAccountingPids
    nvmlVgpuInstanceGetAccountingStats
    nvmlVgpuInstanceGetEccMode
    nvmlVgpuInstanceGetEncoderCapacity
    nvmlVgpuInstanceGetEncoderSessions
    nvmlVgpuInstanceGetEncoderStats
    nvmlVgpuInstanceGetFBCSessions
    nvmlVgpuInstanceGetFBCStats
    nvmlVgpuInstanceGetFbUsage
    nvmlVgpuInstanceGetFrameRateLimit
    nvmlVgpuInstanceGetGpuInstanceId
    nvmlVgpuInstanceGetGpuPciId
    nvmlVgpuInstanceGetLicenseInfo
    nvmlVgpuInstanceGetLicenseInfo_v2
    nvmlVgpuInstanceGetLicenseStatus
    nvmlVgpuInstanceGetMdevUUID
    nvmlVgpuInstanceGetMetadata
    nvmlVgpuInstanceGetPlacementId
    nvmlVgpuInstanceGetRuntimeStateSize
    nvmlVgpuInstanceGetType
    nvmlVgpuInstanceGetUUID
    nvmlVgpuInstanceGetVmDriverVersion
    nvmlVgpuInstanceGetVmID
    nvmlVgpuInstanceSetEncoderCapacity
    nvmlVgpuTypeGetBAR1Info
    nvmlVgpuTypeGetCapabilities
    nvmlVgpuTypeGetClass
    nvmlVgpuTypeGetDeviceID
    nvmlVgpuTypeGetFbReservation
    nvmlVgpuTypeGetFrameRateLimit
    nvmlVgpuTypeGetFramebufferSize
    nvmlVgpuTypeGetGpuInstanceProfileId
    nvmlVgpuTypeGetGspHeapSize
    nvmlVgpuTypeGetLicense
    nvmlVgpuTypeGetMaxInstances
    nvmlVgpuTypeGetMaxInstancesPerGpuInstance
    nvmlVgpuTypeGetMaxInstancesPerVm
    nvmlVgpuTypeGetName
    nvmlVgpuTypeGetNumDisplayHeads
    nvmlVgpuTypeGetResolution
}

#[cfg(test)]
mod tests {
    /// The implemented and unsupported names against every function of
    /// nvml-wrapper-sys's bindings (legacy functions included), see
    /// `gpupool_ffi::symbols`. `GPUPOOL_WRITE_SYMBOLS=1 cargo test -p
    /// gpupool-libnvml symbol_lists` rewrites the list above from them.
    #[test]
    fn symbol_lists_cover_nvml() {
        use gpupool_ffi::symbols;
        use std::collections::BTreeSet;
        let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let sys = symbols::registry_source(&crate_dir.join("../.."), "nvml-wrapper-sys").expect("nvml-wrapper-sys");
        let bindings = std::fs::read_to_string(sys.join("src/bindings.rs")).expect("nvml-wrapper-sys bindings");
        let api = symbols::binding_functions(&bindings, "nvml", Some("legacy-functions"));
        assert!(api.len() > 350, "only {} NVML functions found", api.len());
        let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        // nvmlErrorString returns a string, not an nvmlReturn_t, so it is
        // exported outside the `exports!` macro.
        let implemented: BTreeSet<String> = set(crate::device::EXPORTED)
            .union(&set(crate::system::EXPORTED))
            .cloned()
            .chain(["nvmlErrorString".to_string()])
            .collect();
        let unsupported = set(super::NAMES);
        if std::env::var_os("GPUPOOL_WRITE_SYMBOLS").is_some() {
            let wanted = api.difference(&implemented).cloned().collect();
            symbols::regenerate(&crate_dir.join("src/unsupported.rs"), "unsupported!", &wanted).expect("rewrite");
            return;
        }
        let problems = symbols::check(&api, &implemented, &unsupported, &BTreeSet::new());
        assert!(problems.is_empty(), "symbol lists out of date:\n{}", problems.join("\n"));
    }

    #[test]
    fn stubs_answer_not_supported() {
        assert!(super::NAMES.len() > 300);
        assert!(super::NAMES.contains(&"nvmlDeviceGetTemperature"));
        assert_eq!(
            super::nvmlDeviceGetTemperature(),
            nvml_wrapper_sys::bindings::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED
        );
    }
}
